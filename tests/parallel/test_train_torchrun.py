"""`moelab train` under real torchrun (gloo, CPU): same losses as one process on the same global batch.

aux_loss_coef=0: the router aux loss is per shard by design (docs/distributed.md), so only with it
off is the W-rank objective the one-process objective exactly; the LM losses are compared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.parallel.dist_launch import free_port, worker_env

ARGS = [
    "--preset", "smoke",
    "--set", "train.steps=3",
    "--set", "train.log_every=1",
    "--set", "train.eval_batches=1",
    "--set", "moe.aux_loss_coef=0",
    "--no-progress",
]  # fmt: skip


def _train(out: Path, *extra: str, world: int = 1) -> subprocess.CompletedProcess:
    if world == 1:
        cmd = [sys.executable, "-m", "moelab", "train"]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
            "--master-port", str(free_port()), "-m", "moelab", "train",
        ]  # fmt: skip
    return subprocess.run(
        [*cmd, *ARGS, "--out", str(out), *extra],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["lm_loss"] for r in recs if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("single") / "run"
    r = _train(out)
    assert r.returncode == 0, r.stderr
    return _losses(out)


@pytest.mark.parametrize("ep", ["1", "2"])
def test_torchrun_matches_one_process(single, tmp_path, ep):
    out = tmp_path / "run"
    r = _train(out, "--ep", ep, world=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("val loss") == 1  # rank 0 alone prints
    assert f"(dp {2 // int(ep)}, ep {ep})" in r.stdout
    assert len(single) == 3
    assert _losses(out) == pytest.approx(single, abs=1e-5)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]


def test_world2_checkpoint_resumes_at_world1(single, tmp_path):
    out = tmp_path / "run"
    r = _train(out, "--ep", "2", "--stop-after", "1", world=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_losses(out)) == 1
    r = _train(out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(out) == pytest.approx(single, abs=1e-5)


def test_bad_layout_ends_job_with_one_line(tmp_path):
    r = _train(tmp_path / "run", "--ep", "3", world=2)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("moelab: rank")]
    assert lines and all("--ep" in ln or "ep" in ln for ln in lines), r.stderr[-2000:]

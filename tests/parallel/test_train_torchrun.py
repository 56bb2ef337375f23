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
import torch
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


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grad_accum_under_torchrun_matches_one_process(tmp_path):
    """world 2 × 2 micro-batches = one process × 2 micro-batches of the same global batches."""
    accum = ["--set", "train.grad_accum=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(one, *accum).returncode == 0
    r = _train(two, *accum, "--ep", "2", world=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    assert [x["tokens"] for x in _records(two) if x["kind"] == "train"] == [
        x["tokens"] for x in _records(one) if x["kind"] == "train"
    ]


def test_bf16_under_torchrun_tracks_one_process(tmp_path):
    bf16 = ["--set", "train.precision=bf16"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(one, *bf16).returncode == 0
    r = _train(two, *bf16, world=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(two) == pytest.approx(_losses(one), abs=2e-2)  # bf16 matmuls on half the rows each


def test_router_stats_and_aux_free_bias_are_global(tmp_path):
    """sigmoid_bias updates its bias from the loads of the whole global batch on every rank: the
    world-2 run ends with the one-process bias and logs the same routing statistics."""
    from moelab.convert.load import load_model

    router = ["--set", "moe.router.name=sigmoid_bias", "--set", "moe.router.bias_update_rate=0.01"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(one, *router).returncode == 0
    r = _train(two, *router, "--ep", "2", world=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _records(one), _records(two)
    train_a = [x for x in a if x["kind"] == "train"]
    train_b = [x for x in b if x["kind"] == "train"]
    stats = {k for k in train_a[-1] if k.startswith("moe/") or k in ("drop_rate", "max_expert_load", "load_entropy")}
    assert stats and stats <= set(train_b[-1])
    for k in stats:
        assert train_b[-1][k] == pytest.approx(train_a[-1][k], abs=1e-6), k
    ma, _ = load_model(one)
    mb, _ = load_model(two)
    bias_a = [m.router.bias for m in ma.moe_layers]
    bias_b = [m.router.bias for m in mb.moe_layers]
    assert any(bool(x.abs().sum() > 0) for x in bias_a)  # the bias did move
    for x, y in zip(bias_a, bias_b):
        assert torch.equal(x, y)


def test_init_under_torchrun_matches_one_process(tmp_path):
    """--init loads the full weights on every rank before the experts are sharded over ep."""
    source = tmp_path / "source"
    assert _train(source).returncode == 0
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(one, "--init", str(source)).returncode == 0
    r = _train(two, "--init", str(source), "--ep", "2", world=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    assert _losses(one)[0] < _losses(source)[0] - 0.1  # it started from the trained weights

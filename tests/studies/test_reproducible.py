"""Issue 11: re-running a full-budget study with the same seeds reproduces its committed numbers.

The committed ``docs/studies/capacity.json`` was written by ``moelab study capacity --budget
full --seeds 3`` on one thread per process. This test trains the study's capacity-factor-1.0
arm (the one with drops) for seed 0 exactly as the study does — same base run,
prepared data, steps and per-arm config — in a fresh one-thread process, and requires the
validation loss and drop rates to equal the committed ones. A smoke study run twice must also
write identical numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moelab.studies.base import run_study, shared_corpus

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
from pathlib import Path
from moelab.studies import capacity
from moelab.studies.base import base_run, train_arms

base = base_run("full", capacity.FULL_STEPS)
arms = {"cf1": capacity.capacity_arms(base)["cf1"]}
res = train_arms(base, arms, [0], Path(sys.argv[1]), probe=capacity.drops_by_position)
print(json.dumps({arm: r["per_seed"] for arm, r in res.items()}))
"""


@pytest.mark.slow
@pytest.mark.skipif(shared_corpus() is None, reason="the full budget trains on ../shared/corpus")
def test_full_capacity_study_reproduces_committed_numbers(tmp_path):
    committed = json.loads((ROOT / "docs" / "studies" / "capacity.json").read_text())
    assert committed["budget"] == "full" and committed["seeds"] == [0, 1, 2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout.strip().splitlines()[-1])
    for arm, per_seed in again.items():
        for metric in ("val_loss", "tokens", "drop_rate", "drop_last_quarter"):
            assert per_seed[metric][0] == pytest.approx(committed["arms"][arm]["per_seed"][metric][0], abs=1e-9), (arm, metric)


def test_smoke_study_twice_writes_identical_numbers(tmp_path):
    runs = []
    for i in range(2):
        run_study("placement", "smoke", 2, out=tmp_path / f"runs{i}", docs=tmp_path / f"docs{i}")
        runs.append(json.loads((tmp_path / f"docs{i}" / "placement.json").read_text()))
    assert runs[0]["arms"] == runs[1]["arms"] and runs[0]["verdict_reason"] == runs[1]["verdict_reason"]


def test_runs_side_by_side_give_the_sequential_numbers(tmp_path):
    """--jobs 2 trains the (arm, seed) runs in two one-thread worker processes: the numbers equal a
    sequential one-thread run, and the page says how it ran."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run_study("placement", "smoke", 2, out=tmp_path / "seq", docs=tmp_path / "d_seq")
        torch.set_num_threads(2)
        run_study("placement", "smoke", 2, out=tmp_path / "par", docs=tmp_path / "d_par", jobs=2)
    finally:
        torch.set_num_threads(before)
    seq = json.loads((tmp_path / "d_seq" / "placement.json").read_text())
    par = json.loads((tmp_path / "d_par" / "placement.json").read_text())
    assert seq["arms"] == par["arms"] and seq["numbers"] == par["numbers"]
    assert (par["jobs"], par["threads"]) == (2, 1) and (seq["jobs"], seq["threads"]) == (1, 1)
    assert "2 runs side by side of 1 torch thread each" in (tmp_path / "d_par" / "placement.md").read_text()
    assert all((tmp_path / "par" / "placement" / arm / "seed1" / "metrics.jsonl").is_file() for arm in par["arms"])

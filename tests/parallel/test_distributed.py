"""Multi-process tests on CPU with gloo: expert-parallel dispatch, training steps, checkpoints
across world sizes, and a failing rank. Each test starts W worker processes (tests/parallel/
dist_workers.py) that check themselves against a single-process reference and exit non-zero on a
mismatch; world-4 tests are marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import dist_workers as workers  # noqa: E402
from dist_launch import WORKERS, assert_all_ok, free_port, run_world, worker_env  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.mark.parametrize("world,experts", [(2, 4), pytest.param(4, 8, marks=pytest.mark.slow)])
def test_ep_dispatch_equals_single_process(world, experts):
    """Outputs and gradients (tokens, router, experts) ≤1e-5 for random routing, all tokens to
    one expert, an expert with no tokens, capacity drops, and a whole MoELayer."""
    assert_all_ok(run_world(world, "ep_equal", str(experts)))


@pytest.mark.parametrize(
    "world,mode,ep",
    [
        (2, "ddp", 1),
        (2, "manual", 2),
        pytest.param(2, "fsdp", 2, marks=pytest.mark.slow),
        pytest.param(4, "ddp", 2, marks=pytest.mark.slow),
    ],
)
def test_three_steps_equal_one_process(world, mode, ep):
    """Losses and every parameter after 3 AdamW steps equal one process on the same global batch."""
    assert_all_ok(run_world(world, "train", mode, str(ep), "3"))


@pytest.mark.slow
def test_checkpoint_from_world_2_resumes_at_world_1_and_4(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert_all_ok(run_world(2, "ckpt_save", str(ckpt), "2", "2"))  # ep=2: experts gathered on save
    # world 1, in this process: the ordinary checkpoint loads without a process group
    result1 = tmp_path / "world1.json"
    workers.scenario_ckpt_resume(str(ckpt), "1", "2", "2", str(result1))
    result4 = tmp_path / "world4.json"
    assert_all_ok(run_world(4, "ckpt_resume", str(ckpt), "2", "2", "2", str(result4)))
    _, _, uninterrupted = workers.reference_run(1, range(4), cfg=workers.model_config(aux_loss_coef=0.0))
    for got in (json.loads(result1.read_text()), json.loads(result4.read_text())):
        assert got == pytest.approx(uninterrupted[2:], abs=1e-5)


def test_failing_rank_ends_the_job_with_a_clear_message():
    """Rank 1 meets a label outside the vocabulary at step 1: torchrun exits non-zero, the
    failing rank's message names it, and nothing hangs (the timeout turns a hang into a failure)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(WORKERS), "fail", "--bad-data"]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "moelab: rank 1 of 2 failed: UserError: labels outside the vocabulary" in proc.stderr

"""Multi-process tests on CPU with gloo: expert-parallel dispatch, training steps, checkpoints
across world sizes, and a failing rank.

Starting processes dominates the cost on a small machine, so one world-2 job and one world-4 job
(tests/parallel/dist_workers.py) each run several checks against a single-process reference;
a rank that finds a mismatch exits non-zero with the failed check on stderr, shown here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import dist_workers as workers
from dist_launch import WORKERS, assert_all_ok, free_port, run_world, worker_env

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """One world-2 job: its results and the checkpoint it saved (ep=2)."""
    ckpt = tmp_path_factory.mktemp("dist") / "ckpt"
    return run_world(2, "world2", str(ckpt)), ckpt


@pytest.fixture(scope="module")
def world4(world2, tmp_path_factory):
    """One world-4 job (dp=2, ep=2), resuming the world-2 checkpoint; its results and losses file."""
    result = tmp_path_factory.mktemp("dist") / "world4.json"
    return run_world(4, "world4", str(world2[1]), str(result)), result


def test_world2_ep_dispatch_and_training_equal_one_process(world2):
    """EP outputs and gradients (tokens, router, experts) ≤1e-5 for random routing, all tokens to
    one expert, an expert with no tokens, capacity drops and a whole MoELayer; 3 AdamW steps with
    DDP (dp=2), manual all-reduce (ep=2) and FSDP2 (ep=2) give the losses and parameters of one
    process on the same global batch (≤1e-5)."""
    assert_all_ok(world2[0])


@pytest.mark.slow
def test_world4_ep_dispatch_and_training_equal_one_process(world4):
    """The same at world 4: E=8 (two experts a rank) and 3 steps with dp=2 × ep=2."""
    assert_all_ok(world4[0])


@pytest.mark.slow
def test_checkpoint_from_world_2_resumes_at_world_1_and_4(world2, world4, tmp_path):
    """Saved at world 2 (experts gathered from ep=2), resumed at world 1 (this process, no process
    group) and world 4: the next steps' losses equal an uninterrupted world-1 run (≤1e-5)."""
    assert_all_ok(world2[0])
    assert_all_ok(world4[0])
    result1 = tmp_path / "world1.json"
    workers.resume_and_train(workers.init_distributed(), str(world2[1]), 1, str(result1))
    _, _, uninterrupted = workers.reference_run(1, range(4), cfg=workers.model_config(aux_loss_coef=0.0))
    for got in (json.loads(result1.read_text()), json.loads(world4[1].read_text())):
        assert got == pytest.approx(uninterrupted[workers.CKPT_STEPS :], abs=1e-5)


def torchrun_fail(*args: str) -> subprocess.CompletedProcess:
    """Run the ``fail`` scenario under real torchrun (its agent stops the other ranks)."""
    port = str(free_port())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
    ]
    cmd += ["--master-port", port, str(WORKERS), "fail", *args]
    return subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=120)


def test_failing_rank_ends_the_job_with_a_clear_message():
    """Rank 1 meets a label outside the vocabulary at step 1: torchrun exits non-zero, the
    failing rank's message names it, and rank 0 (blocked in a collective) does not hang. (Rank 0's own
    line is not asserted: torchrun may stop it before it prints.)"""
    proc = torchrun_fail("20", "--bad-data")
    assert proc.returncode != 0
    assert "moelab: rank 1 of 2 failed: UserError: labels outside the vocabulary" in proc.stderr


@pytest.mark.slow
def test_hung_rank_makes_peers_time_out():
    """Rank 1 hangs (sleeps) at step 1: the process-group timeout (3 s) ends rank 0's collective,
    rank 0 says so and exits, and torchrun stops the hung rank."""
    proc = torchrun_fail("3", "--hang")
    assert proc.returncode != 0
    assert "moelab: rank 0 of 2 stopped: a collective failed" in proc.stderr
    assert "timed out" in proc.stderr.lower()

"""kill -9 while checkpoints are being saved and pruned: the newest complete checkpoint still loads,
and no half-written or half-deleted folder is ever taken for a complete checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from moelab.checkpoint.folder import latest_checkpoint, list_checkpoints, verify_checkpoint
from moelab.convert.load import load_model

SRC = str(Path(__file__).resolve().parents[2] / "src")
KILLS = 4
SEED = 25

# Saves step 1, 2, ... of a run (continuing after the newest complete checkpoint), every weight equal to
# the step, keep-last 2; prints "ready" once its first checkpoint is on disk.
WRITER = """
import sys
from pathlib import Path
import torch
from moelab.config import DataConfig, ModelConfig, RunConfig
from moelab.data.tokenizer import BytesTokenizer
from moelab.model.transformer import Transformer
from moelab.checkpoint.folder import checkpoint_name, latest_checkpoint, prune_checkpoints
from moelab.checkpoint.state import save_checkpoint

run = Path(sys.argv[1])
cfg = RunConfig(model=ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, ffn_hidden=256, max_seq_len=64),
                data=DataConfig(seq_len=32))
model = Transformer(cfg.model)
last = latest_checkpoint(run)
step = int(last.name.split("_")[1]) if last is not None else 0
ready = False
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    path = save_checkpoint(run / "checkpoints" / checkpoint_name(step), model, cfg, BytesTokenizer(),
                           train_state={"step": step})
    prune_checkpoints(run, keep_last=2, newest=path)
    if not ready:
        print("ready", flush=True)
        ready = True
"""


def _check(run: Path) -> int:
    """Every ``step_`` folder is complete and holds its own step's weights; the newest loads. Its step."""
    folders = list_checkpoints(run)
    assert folders, "no checkpoint survived"
    for p in folders:
        assert verify_checkpoint(p) is None, f"{p.name}: {verify_checkpoint(p)}"  # never half-written/deleted
        step = int(p.name.split("_")[1])
        assert json.loads((p / "state.json").read_text())["train_state"]["step"] == step
    newest = latest_checkpoint(run)
    assert newest == folders[-1]
    model, _ = load_model(run)
    step = int(newest.name.split("_")[1])
    assert all(torch.all(p == step) for p in model.parameters())  # the weights of that step, not a mix
    return step


def test_kill_minus_nine_during_saves_leaves_a_loadable_run(tmp_path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    rng = random.Random(SEED)
    steps = []
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run)], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.05, 0.5))  # somewhere inside a save or a prune
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        steps.append(_check(run))
    assert steps == sorted(steps) and len(set(steps)) == KILLS  # every writer got further than the last

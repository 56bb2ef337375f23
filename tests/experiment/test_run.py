"""The run assembly layer: train_run hands back what it trained, in memory; run_all side by side = one at a time."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch

from moelab.config import run_preset
from moelab.convert.load import load_model
from moelab.errors import UserError
from moelab.experiment.run import TrainedRun, prepare, train_run
from moelab.experiment.runs import RunSpec, run_all


def _cfg(steps: int = 4):
    cfg = run_preset("smoke")
    data = replace(cfg.data, corpus="synthetic", synthetic_docs=8, seq_len=32)
    train = replace(cfg.train, steps=steps, batch_size=4, eval_every=2, eval_batches=2, log_every=1, progress=False)
    model = replace(cfg.model, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    return replace(cfg, data=data, train=train, model=replace(model, moe=replace(model.moe, num_experts=4, expert_hidden=32)))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))


def test_train_run_returns_the_trained_model_its_split_and_its_records(tmp_path) -> None:
    run = train_run(_cfg(), tmp_path / "run")
    assert isinstance(run, TrainedRun) and run.steps == 4 and run.tokens == 4 * 4 * 32
    on_disk = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert run.records == on_disk  # metrics.jsonl, in memory
    assert [r["schedule_steps"] for r in run.records if r["kind"] == "eval"] == [4, 4]
    saved, _ = load_model(tmp_path / "run")
    for (name, p), (_, q) in zip(run.model.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(p, q), name  # the model in memory is the one checkpointed
    assert run.val is run.data.splits.val and run.val.num_blocks > 0
    assert run.train_flops == pytest.approx(run.flops_per_token * run.tokens) and run.flops_formula == "calc"


def test_resumed_run_keeps_its_tokenizer_and_equals_an_uninterrupted_one(tmp_path) -> None:
    cfg = _cfg()
    whole = train_run(cfg, tmp_path / "whole")
    train_run(cfg, tmp_path / "split", stop_at=2)
    resumed = train_run(cfg, tmp_path / "split", resume=True)
    assert resumed.result.loss == whole.result.loss
    assert [r["step"] for r in resumed.records if r["kind"] == "train"] == [1, 2, 3, 4]


def _loss_probe(run: TrainedRun, scale: float) -> dict:
    return {"scaled": scale * run.result.loss, "blocks": run.val.num_blocks}


def test_runs_side_by_side_equal_runs_one_at_a_time(tmp_path) -> None:
    cfg, data = prepare(_cfg())
    specs = lambda root: [  # noqa: E731
        RunSpec(name, seed, replace(cfg, train=replace(cfg.train, seed=seed)), root / name / f"s{seed}",
                partial(_loss_probe, scale=2.0))
        for name in ("a", "b") for seed in (0, 1)
    ]  # fmt: skip
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        seq = run_all(specs(tmp_path / "seq"), data, jobs=1)
        torch.set_num_threads(2)
        par = run_all(specs(tmp_path / "par"), data, jobs=2)  # two workers of one thread each
    finally:
        torch.set_num_threads(before)
    assert [(o.name, o.seed) for o in par] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    for s, p in zip(seq, par):
        assert s.result.loss == p.result.loss and s.probe == p.probe and s.probe["scaled"] == 2.0 * s.result.loss
    assert seq[0].result.loss != seq[1].result.loss  # seeds differ


def test_runs_of_one_batch_need_their_own_folders(tmp_path) -> None:
    cfg, data = prepare(_cfg())
    same = [RunSpec("a", s, cfg, tmp_path / "x") for s in (0, 1)]
    with pytest.raises(UserError, match="share a run folder"):
        run_all(same, data)
    assert not Path(tmp_path / "x").exists()

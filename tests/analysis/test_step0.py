"""The step-0 (untrained) model: rebuilt from a run's config it is exactly the Trainer's initial model;
without a run config it is a seed-0 random init, and says so."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moelab.analysis.step0 import initial_model_for, initial_model_from_config
from moelab.config import run_preset
from moelab.convert.hf import save_moelab
from moelab.model.transformer import Transformer
from moelab.train.trainer import Trainer


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_step0_model_is_the_trainers_initial_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    cfg = run_preset("smoke")
    cfg = replace(
        cfg,
        data=replace(cfg.data, corpus="synthetic", synthetic_docs=6),
        train=replace(cfg.train, steps=2, eval_every=0, log_every=1, seed=3, progress=False),
    )
    trainer = Trainer(cfg, tmp_path / "run")
    initial = _state(trainer.model)
    trainer.train()
    trainer.save()
    assert not _equal(initial, _state(trainer.model))  # training moved the weights
    torch.manual_seed(11)
    expected_next = torch.rand(3)
    torch.manual_seed(11)
    model, info = initial_model_for(tmp_path / "run", trainer.model)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream did not move
    assert info["source"] == "run config" and info["seed"] == 3
    assert _equal(_state(model), initial) and not model.training
    other = initial_model_from_config(replace(trainer.cfg, train=replace(trainer.cfg.train, seed=4)))
    assert not _equal(_state(other), initial)  # the seed is what makes it this run's step 0


def test_folder_without_run_config_gets_a_seed0_random_init(tmp_path):
    cfg = replace(run_preset("smoke").model, vocab_size=64)
    torch.manual_seed(5)
    trained = Transformer(cfg)
    save_moelab(trained, tmp_path / "converted")
    model, info = initial_model_for(tmp_path / "converted", trained)
    assert info["source"] == "random init" and info["seed"] == 0 and "no run config" in info["note"]
    torch.manual_seed(0)
    assert _equal(_state(model), _state(Transformer(cfg)))
    assert not _equal(_state(model), _state(trained))


def test_missing_checkpoint_is_a_user_error(tmp_path):
    from moelab.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        initial_model_for(tmp_path / "nothing", Transformer(replace(run_preset("smoke").model, vocab_size=64)))


def test_a_step0_model_that_does_not_fit_is_skipped_with_its_reason(tmp_path, monkeypatch):
    """A released model at full size leaves no room for a second copy: the step-0 column is skipped (the
    shuffled-label baseline still applies) and analysis.json says why, instead of the analysis failing."""
    from moelab.hardware import AvailableMemory
    from moelab.model import memory_guard

    from helpers import tiny_config, tiny_moe

    model = Transformer(tiny_config(moe=tiny_moe()))
    save_moelab(model, tmp_path / "m")
    monkeypatch.delenv(memory_guard.ALLOW_ENV, raising=False)
    monkeypatch.setattr(memory_guard, "available_memory", lambda device="cpu": AvailableMemory(1000, "test"))
    initial, info = initial_model_for(tmp_path / "m", model)
    assert initial is None and info["source"] == "skipped"
    assert "step-0 model skipped" in info["note"] and "parameters" in info["note"]

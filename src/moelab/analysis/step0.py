"""The untrained (step-0) model beside a trained one: the baseline that tells what *training* changed.

Why rebuild instead of saving: the Trainer's initial weights are a pure function of the run
config. It calls ``torch.manual_seed(train.seed)`` and then builds the model with
``objective_step.build_model(model config, objective)``, nothing drawing random numbers in
between; doing the same here reproduces the initial weights exactly, with no step-0 checkpoint.

A folder without a run config (a converted Hugging Face or ``moelab convert`` folder, or a
checkpoint whose config.yaml holds only a model config) has no seed to reproduce: the step-0
model is then a random initialisation of the same architecture with seed 0, and the returned
``info`` says so, because it is *a* random router, not this model's own starting point.

The global torch RNG is forked around the build so that callers' random streams do not move.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from moelab.config import RunConfig

RANDOM_INIT_SEED = 0


def initial_model_from_config(cfg: RunConfig) -> nn.Module:
    """The model a Trainer built for ``cfg`` before its first step (weights equal, in eval mode, on CPU).

    ``cfg`` is the run config the Trainer saved (its ``model.vocab_size`` already the tokenizer's).
    """
    from moelab.train.objective_step import build_model, objective_of

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, objective_of(cfg))
    return model.eval()


def random_init_like(model: nn.Module, seed: int = RANDOM_INIT_SEED) -> nn.Module:
    """A fresh random initialisation of ``model``'s architecture (its class built from its ``cfg``)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no .cfg to rebuild it from")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(cfg)
    return fresh.eval()


def _has_run_config(ckpt: Path) -> bool:
    """config.yaml is a whole run config (a ``model`` section beside the others), not a model-only config."""
    try:
        data = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "model" in data


def initial_model_for(path: str | Path, trained: nn.Module) -> tuple[nn.Module | None, dict[str, Any]]:
    """``(step-0 model, info)`` for the checkpoint, run or model folder ``path`` that ``trained`` was loaded from.

    ``info``: ``{"source": "run config" | "random init" | "skipped", "seed": int, "note": str}``; it goes
    into analysis.json so a reader knows which baseline the step-0 numbers are. When a second (fp32)
    copy of the model does not fit beside ``trained`` (a released model at full size), the model is
    None and ``info`` says why: the shuffled-label baseline is still subtracted, only the step-0
    column is missing.
    """
    from moelab.model.memory_guard import ModelTooLargeError

    try:
        return _initial_model_for(path, trained)
    except ModelTooLargeError as exc:
        note = f"step-0 model skipped: {str(exc).split(';')[0]}"
        return None, {"source": "skipped", "seed": None, "note": note}


def _initial_model_for(path: str | Path, trained: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    from moelab.checkpoint.folder import is_model_folder, read_run_config, resolve_checkpoint

    p = Path(path)
    if not is_model_folder(p):
        ckpt = resolve_checkpoint(p)
        if _has_run_config(ckpt):
            cfg = read_run_config(ckpt)
            model = initial_model_from_config(cfg)
            note = "the run's own initial weights: torch.manual_seed(train.seed), then build_model as the Trainer does"
            return model, {"source": "run config", "seed": cfg.train.seed, "note": note}
    model = random_init_like(trained)
    note = f"no run config with a seed: a random initialisation (seed {RANDOM_INIT_SEED}) of the same architecture"
    return model, {"source": "random init", "seed": RANDOM_INIT_SEED, "note": note}

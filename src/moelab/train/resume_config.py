"""Resuming with another config: name every field that differs, and accept only what may change.

A checkpoint records the run config it was trained with. Resuming with a different ``train.steps``
or ``train.lr`` used to be accepted silently (the schedule then changes mid-run and the result is
neither run), so the saved and the new config are compared field by field:

- ``model.*``, ``data.*`` and ``train.lora.*`` can never change, not even when asked: the weights have
  the model's shape (and its adapters), and the saved sampler position counts blocks of that data;
- :data:`FREE` fields change no number (the run's name, progress bar, TensorBoard, how often it
  logs and saves, how many checkpoints it keeps, the device) and change freely;
- every other field (``train.steps``, ``train.lr``, the schedule, the batch size, …) changes only
  with ``allow_change`` (``--allow-config-change``), and the changes are then reported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moelab.config import RunConfig, to_dict
from moelab.errors import UserError
from moelab.moe.validate import check_model_config

FREE = frozenset(
    {"name", "train.progress", "train.tensorboard", "train.log_every", "train.save_every", "train.keep_last",
     "train.device"}
)  # fmt: skip
FROZEN_SECTIONS = ("model", "data")
FROZEN_PREFIXES = ("train.lora.",)  # adapters change which tensors a checkpoint holds
SHOWN = 6  # fields named in one message


@dataclass(frozen=True)
class ConfigChange:
    """One field (dotted name) whose value differs between the saved and the new config."""

    field: str
    saved: Any
    new: Any

    @property
    def frozen(self) -> bool:
        return self.field.split(".", 1)[0] in FROZEN_SECTIONS or self.field.startswith(FROZEN_PREFIXES)

    def __str__(self) -> str:
        return f"{self.field} {self.saved!r} -> {self.new!r}"


def _diff(saved: Any, new: Any, prefix: str) -> list[ConfigChange]:
    if isinstance(saved, dict) and isinstance(new, dict):
        out = []
        for key in list(saved) + [k for k in new if k not in saved]:
            name = f"{prefix}.{key}" if prefix else str(key)
            out += _diff(saved.get(key), new.get(key), name)
        return out
    return [] if saved == new else [ConfigChange(prefix, saved, new)]


def config_changes(saved: RunConfig, new: RunConfig) -> list[ConfigChange]:
    """Every leaf field that differs (a section that is None on one side is one change)."""
    # router options compare resolved: a config written before routers owned their options lists every
    # old option at its default, a new one only the router's own
    saved, new = (replace(c, model=check_model_config(c.model)) for c in (saved, new))
    return _diff(to_dict(saved), to_dict(new), "")


def _listing(changes: list[ConfigChange]) -> str:
    shown = ", ".join(map(str, changes[:SHOWN]))
    return shown + (f" and {len(changes) - SHOWN} more" if len(changes) > SHOWN else "")


def check_resume_config(ckpt: Path, saved: RunConfig, new: RunConfig, allow_change: bool = False) -> list[ConfigChange]:
    """The changes a resume from ``ckpt`` accepts (empty when the configs agree); a UserError naming the
    fields when a frozen one differs, or when others do and ``allow_change`` is False."""
    changes = [c for c in config_changes(saved, new) if c.field not in FREE]
    frozen = [c for c in changes if c.frozen]
    if frozen:
        raise UserError(
            f"{ckpt} was trained with a different model or data config ({_listing(frozen)}); these cannot change "
            "when resuming: resume with the saved values, or start a new run in another --out"
        )
    if changes and not allow_change:
        raise UserError(
            f"--resume: the config differs from the one {ckpt} was trained with ({_listing(changes)}): pass "
            "--allow-config-change to continue with the new values, or resume with the saved ones"
        )
    return changes

"""Training objectives: packed token blocks → model inputs, labels and masks, and their metrics.

``causal`` (next token, decoder), ``prefix`` (prefix-LM, decoder with ``attention='prefix'``),
``mlm`` (BERT masking, encoder with ``attention='bidirectional'``), ``span`` (T5 span
corruption, encoder–decoder). How a trainer uses them: docs/objectives.md.
"""

from __future__ import annotations

from typing import Any

from moelab.config import IGNORE_INDEX
from moelab.objectives.base import ARCHITECTURES, Objective, ObjectiveBatch
from moelab.objectives.registry import OBJECTIVES

# Importing the modules registers them.
from moelab.objectives import causal, mlm, prefix, span  # noqa: F401  isort: skip


def build_objective(name: str, **settings: Any) -> Objective:
    """The objective ``name`` with its settings (e.g. ``build_objective("mlm", mask_prob=0.2)``)."""
    cls = OBJECTIVES[name]
    try:
        return cls(**settings)
    except TypeError as exc:  # unknown setting
        from dataclasses import fields

        from moelab.config import ConfigError

        allowed = ", ".join(f.name for f in fields(cls)) or "none"
        raise ConfigError(
            f"objective {name!r} got an unknown setting ({exc}); its settings: {allowed}"
        ) from None


__all__ = ["ARCHITECTURES", "IGNORE_INDEX", "OBJECTIVES", "Objective", "ObjectiveBatch", "build_objective"]

"""Input checks and JSON conversion shared by the statistics modules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

VERDICTS = ("supported", "not supported", "inconclusive")
_EXACT_SIGN_FLIP_MAX_N = 16  # 2**16 sign patterns is still cheap to enumerate
_CHUNK = 2_000_000  # numbers per resampling block: bounds memory for long inputs


# ---------------------------------------------------------------------------------------- helpers


def _array(xs: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(xs, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat list of numbers, got an array of shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} contains non-finite values ({arr.tolist()}); a diverged run has no number to "
            "compare: rerun it or leave that seed out of every arm"
        )
    return arr


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"the interval level must lie strictly between 0 and 1, got {level}")


def _check_count(value: int, name: str) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _json(value: Any) -> Any:
    """JSON-able copy: non-finite floats become None, tuples lists, our dataclasses their to_json()."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, tuple | list):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value



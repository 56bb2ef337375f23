"""The dtype a matmul on a tensor runs in, for ops autocast does not cast (``grouped_mm``, LoRA's own path)."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype where autocast is on, else ``x.dtype``.

    Why: ``F.grouped_mm`` is not on autocast's cast list, so its callers cast by hand.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


__all__ = ["compute_dtype"]

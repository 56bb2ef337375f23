"""``auto``: pick the backend that `moelab bench` measured fastest for this device, dtype and shape.

The rules (docs/performance.md has the numbers behind them):
- CUDA, bf16 and ``F.grouped_mm`` usable: ``grouped_mm`` (one kernel per projection, no host
  sync for the group sizes).
- CPU, bf16 (autocast), many small experts (E ≥ 32) and ``F.grouped_mm`` usable:
  ``grouped_mm``; its ATen loop beats Python per-expert calls once there are many experts.
- everything else: ``sorted`` (contiguous per-expert slices, weights unbound once), which
  was within a few percent of the dense twin in fp32 on CPU.

The choice is a pure function of what the call sees, so ``auto`` stays correct whatever it picks.

Legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.moe.decision import RoutingDecision
from moelab.moe.dispatch.base import DISPATCHERS
from moelab.moe.experts import Experts, compute_dtype

MANY_EXPERTS = 32  # CPU bf16: from here on grouped_mm beats the per-slice loop


def choose_backend(device: torch.device, dtype: torch.dtype, experts: Experts) -> str:
    """Name of the backend ``auto`` runs for compute ``dtype`` on ``device``."""
    if not experts.grouped_mm_supported(dtype, device) or dtype != torch.bfloat16:
        return "sorted"
    if device.type == "cuda":
        return "grouped_mm"
    if device.type == "cpu" and experts.num_experts >= MANY_EXPERTS:
        return "grouped_mm"
    return "sorted"


@DISPATCHERS.register("auto")
def auto_dispatch(x_TD: Tensor, decision: RoutingDecision, experts: Experts) -> Tensor:
    """``[T, D] → [T, D]``; runs the backend :func:`choose_backend` names."""
    name = choose_backend(x_TD.device, compute_dtype(x_TD), experts)
    return DISPATCHERS[name](x_TD, decision, experts)

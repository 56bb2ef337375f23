"""Expert capacity and drop policies.

Capacity (GShard, Switch): each expert takes at most ``C = ceil(capacity_factor · K · T / E)``
assignments per batch, the seeds' buffer ``B = C·K·N·L`` spread evenly over E experts. An
over-full expert keeps its C highest-priority assignments; the rest are marked dropped in the
decision (``kept=False``): they contribute nothing, and the token still passes through the
residual connection.

Policies (lower priority value wins):
- ``position``: earlier tokens in the flattened batch win (token-major order), so drops fall on
  the ends of sequences; this is what "drops towards the end" analyses measure.
- ``score``: higher combine weight wins.

Legend: T tokens, E experts, K top-k, A assignments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from moelab.moe.decision import RoutingDecision
from moelab.registry import Registry

PriorityFn = Callable[[RoutingDecision], Tensor]
DROP_POLICIES: Registry[PriorityFn] = Registry("drop policy")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """``C = ceil(capacity_factor · K · T / E)``: assignments one expert may receive."""
    return max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


@DROP_POLICIES.register("position")
def position_priority(decision: RoutingDecision) -> Tensor:
    """``[A]`` earlier assignments (token-major) win."""
    return torch.arange(decision.num_assignments, device=decision.token.device, dtype=torch.float64)


@DROP_POLICIES.register("score")
def score_priority(decision: RoutingDecision) -> Tensor:
    """``[A]`` higher combine weight wins."""
    return -decision.weight.detach().to(torch.float64)


def keep_within_capacity(expert_A: Tensor, priority_A: Tensor, num_experts: int, capacity: int) -> Tensor:
    """``[A]`` bool: True for the ``capacity`` best-priority assignments of every expert.

    One stable sort by priority, then a stable sort by expert, gives each expert's assignments
    in priority order; an assignment's place in that list decides whether it fits.
    """
    by_priority = torch.argsort(priority_A, stable=True)
    order = by_priority[torch.argsort(expert_A[by_priority], stable=True)]
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    place_sorted = torch.arange(expert_A.numel(), device=expert_A.device) - starts_E[expert_A[order]]
    kept = torch.empty_like(expert_A, dtype=torch.bool)
    kept[order] = place_sorted < capacity
    return kept


def apply_capacity(
    decision: RoutingDecision, capacity_factor: float | None, policy: str, top_k: int
) -> RoutingDecision:
    """Mark assignments beyond each expert's capacity as dropped. ``None`` = dropless (unchanged)."""
    if capacity_factor is None:
        return decision
    capacity = expert_capacity(decision.num_tokens, decision.num_experts, top_k, capacity_factor)
    kept = keep_within_capacity(decision.expert, DROP_POLICIES[policy](decision), decision.num_experts, capacity)
    return decision.with_kept(kept & decision.kept, capacity)

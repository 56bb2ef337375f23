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
- ``batch_priority``: batch-prioritised routing (Riquelme et al. 2021, V-MoE §3.1 "BPR"): all
  first choices before any second choice, and within a rank the tokens with the highest top
  router score across the whole batch first, so confident tokens survive wherever they sit.
- ``none``: dropless; the capacity factor is ignored and nothing is dropped.

Scope (``moe.capacity_scope``): ``batch`` counts capacity over the flattened batch (T = B·S);
``sequence`` gives every sequence its own capacity per expert (T = S), as transformers'
``SwitchTransformersTop1Router`` does (its "groups" are the rows of the batch). A fixed
``moe.expert_capacity`` replaces the computed C (HF Switch's ``expert_capacity``).

Padding tokens always come last, whatever the policy, so they never take a real token's slot.
The drop rate of a layer is ``decision.drop_rate`` (and ``LayerStats.drop_rate`` on valid tokens).

Legend: T tokens, E experts, K top-k, A assignments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from moelab.moe.decision import RoutingDecision
from moelab.registry import Registry

PriorityFn = Callable[[RoutingDecision], Tensor | None]  # None = keep everything
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


@DROP_POLICIES.register("batch_priority")
def batch_priority(decision: RoutingDecision) -> Tensor:
    """``[A]`` rank first, then the token's top score across the batch (higher wins)."""
    T = decision.num_tokens
    importance_T = decision.scores.detach().max(dim=-1).values
    place_T = torch.empty(T, dtype=torch.float64, device=importance_T.device)
    place_T[torch.argsort(-importance_T, stable=True)] = torch.arange(T, dtype=torch.float64, device=place_T.device)
    return decision.rank.to(torch.float64) * T + place_T[decision.token]


@DROP_POLICIES.register("none")
def no_drops(decision: RoutingDecision) -> None:
    """Dropless: every assignment is kept."""
    return None


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
    decision: RoutingDecision,
    capacity_factor: float | None,
    policy: str,
    top_k: int,
    scope: str = "batch",
    fixed_capacity: int | None = None,
) -> RoutingDecision:
    """Mark assignments beyond each expert's capacity as dropped. No factor and no fixed capacity = dropless.

    ``scope="sequence"``: capacity per (sequence, expert) pair, ``C`` from the sequence length S.
    """
    if capacity_factor is None and fixed_capacity is None:
        return decision
    priority_A = DROP_POLICIES[policy](decision)
    if priority_A is None:
        return decision
    if decision.token_mask is not None:  # padding after every real token
        pad_A = ~decision.token_mask.reshape(-1).bool()[decision.token]
        span = (priority_A.max() - priority_A.min()).abs() + 1 if priority_A.numel() else 1
        priority_A = priority_A + pad_A.to(priority_A.dtype) * span
    E = decision.num_experts
    group_tokens = decision.batch_shape[1] if scope == "sequence" else decision.num_tokens
    capacity = fixed_capacity or expert_capacity(group_tokens, E, top_k, capacity_factor)  # type: ignore[arg-type]
    if scope == "sequence":  # one bin per (sequence, expert): bin = b·E + e
        bin_A = (decision.token // decision.batch_shape[1]) * E + decision.expert
        kept = keep_within_capacity(bin_A, priority_A, decision.batch_shape[0] * E, capacity)
    else:
        kept = keep_within_capacity(decision.expert, priority_A, E, capacity)
    return decision.with_kept(kept & decision.kept, capacity)

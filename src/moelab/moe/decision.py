"""RoutingDecision: the one record of what a router decided.

Routers make it, capacity policies return a copy with drops marked, dispatch backends consume
it, losses are pure functions of it and analysis records it. Nothing downstream re-derives
routing from logits.

Legend: T tokens (flattened batch × seq), E experts, K top-k, A assignments (T·K for
token-choice routers; any count for expert choice).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class RoutingDecision:
    """Assignments of tokens to experts, with the router's raw evidence.

    Attributes:
        token: ``[A]`` long, flattened token index in ``[0, T)``.
        expert: ``[A]`` long, expert index in ``[0, E)``.
        weight: ``[A]`` float, final combine weight (carries gradient to the router).
        rank: ``[A]`` long, 0 = the token's best choice (token choice) or the place in the
            expert's pick list (expert choice).
        kept: ``[A]`` bool, False where a capacity policy dropped the assignment.
        logits: ``[T, E]`` fp32 raw router logits.
        scores: ``[T, E]`` fp32 after softmax/sigmoid, before selection.
        num_experts: E.
        batch_shape: ``(B, S)`` so positions can be recovered (t = b·S + s).
        token_mask: ``[T]`` bool or None; False marks padding that losses must ignore.
        capacity: per-expert capacity applied, or None when dropless.
    """

    token: Tensor
    expert: Tensor
    weight: Tensor
    rank: Tensor
    kept: Tensor
    logits: Tensor
    scores: Tensor
    num_experts: int
    batch_shape: tuple[int, int]
    token_mask: Tensor | None = None
    capacity: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]

    @property
    def num_assignments(self) -> int:
        return self.token.shape[0]

    @property
    def position(self) -> Tensor:
        """``[A]`` position of each assignment's token in its sequence."""
        return self.token % self.batch_shape[1]

    def tokens_per_expert(self, kept_only: bool = True) -> Tensor:
        """``[E]`` long: assignments each expert receives (after drops unless ``kept_only=False``)."""
        expert = self.expert[self.kept] if kept_only else self.expert
        return torch.bincount(expert, minlength=self.num_experts)

    @property
    def drop_rate(self) -> Tensor:
        """Fraction of assignments dropped by the capacity policy (0-d float tensor)."""
        if self.num_assignments == 0:
            return torch.zeros((), device=self.kept.device)
        return 1.0 - self.kept.float().mean()

    def with_kept(self, kept: Tensor, capacity: int | None = None) -> RoutingDecision:
        """A copy with drops marked; the original is left untouched."""
        return replace(self, kept=kept, capacity=capacity)

    def detach(self) -> RoutingDecision:
        """A copy without autograd history, for tracing and analysis."""
        return replace(self, weight=self.weight.detach(), logits=self.logits.detach(), scores=self.scores.detach())


def token_choice_decision(
    expert_TK: Tensor,
    weight_TK: Tensor,
    logits_TE: Tensor,
    scores_TE: Tensor,
    batch_shape: tuple[int, int],
    token_mask_T: Tensor | None = None,
) -> RoutingDecision:
    """Flatten a token-choice selection ``[T, K]`` into assignments, token-major (a = t·K + j)."""
    T, K = expert_TK.shape
    device = expert_TK.device
    return RoutingDecision(
        token=torch.arange(T, device=device).repeat_interleave(K),
        expert=expert_TK.reshape(-1),
        weight=weight_TK.reshape(-1),
        rank=torch.arange(K, device=device).repeat(T),
        kept=torch.ones(T * K, dtype=torch.bool, device=device),
        logits=logits_TE,
        scores=scores_TE,
        num_experts=logits_TE.shape[-1],
        batch_shape=batch_shape,
        token_mask=token_mask_T,
    )

"""Group kept assignments by expert, and combine expert outputs back into tokens.

Shared by the ``sorted``, ``grouped_mm`` and ``padded`` backends: one stable sort of the kept
assignments by expert gives contiguous per-expert row ranges; one ``index_add`` scatters the
weighted rows back. Nothing here assumes token-major order or one assignment per (token, k):
expert-choice decisions (any count, a token 0..E times) group the same way.

Memory: ``index_select`` saves only the index for its backward, and the weighted product
``out · w`` is a temporary, so autograd keeps the gathered rows once (inside the experts),
not a second permuted copy of the input.

Legend: T tokens, D model dim, E experts, A assignments, R kept assignments (rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.moe.decision import RoutingDecision


@dataclass(frozen=True)
class Grouping:
    """Kept assignments sorted by expert.

    Attributes:
        assignment_R: ``[R]`` index into the decision's assignments, grouped by expert.
        token_R: ``[R]`` token of each row.
        expert_R: ``[R]`` expert of each row (non-decreasing).
        tokens_per_expert_E: ``[E]`` long, rows per expert.
    """

    assignment_R: Tensor
    token_R: Tensor
    expert_R: Tensor
    tokens_per_expert_E: Tensor

    @property
    def num_rows(self) -> int:
        return self.token_R.shape[0]

    def slot_R(self) -> Tensor:
        """``[R]`` each row's place within its expert's group (0, 1, ... per expert)."""
        starts_E = torch.cumsum(self.tokens_per_expert_E, 0) - self.tokens_per_expert_E
        return torch.arange(self.num_rows, device=self.token_R.device) - starts_E[self.expert_R]


def group_by_expert(decision: RoutingDecision) -> Grouping:
    """Stable sort of the kept assignments by expert (ties keep assignment order)."""
    (kept_R,) = torch.nonzero(decision.kept, as_tuple=True)
    expert_kept_R = decision.expert[kept_R]
    order_R = torch.argsort(expert_kept_R, stable=True)
    assignment_R = kept_R[order_R]
    expert_R = expert_kept_R[order_R]
    return Grouping(
        assignment_R=assignment_R,
        token_R=decision.token[assignment_R],
        expert_R=expert_R,
        tokens_per_expert_E=torch.bincount(expert_R, minlength=decision.num_experts),
    )


def combine(out_RD: Tensor, grouping: Grouping, decision: RoutingDecision, num_tokens: int) -> Tensor:
    """``y_t = Σ_{rows r of token t} weight_r · out_r``: ``[R, D] → [T, D]`` in ``out``'s dtype.

    The combine weight carries gradient to the router; dropped assignments have no row.
    """
    weight_R1 = decision.weight[grouping.assignment_R].unsqueeze(-1).to(out_RD.dtype)
    return add_rows(out_RD * weight_R1, grouping, num_tokens)


def add_rows(out_RD: Tensor, grouping: Grouping, num_tokens: int) -> Tensor:
    """``y_t = Σ_{rows r of token t} out_r`` for rows already weighted: ``[R, D] → [T, D]``."""
    y_TD = out_RD.new_zeros(num_tokens, out_RD.shape[-1])
    return y_TD.index_add(0, grouping.token_R, out_RD)

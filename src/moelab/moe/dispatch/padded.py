"""``padded``: GShard-style capacity buffer ``[E, C, D]`` and two batched matmuls.

Rows are scattered into a zero buffer of C slots per expert (C = the decision's capacity
where a capacity policy set one, else the largest expert load), run through ``bmm`` and
gathered back. Static shapes when C is fixed make it the ``torch.compile``- and
accelerator-friendly layout; padding costs ``E·C − R`` wasted rows, so it suits balanced loads.

Legend: T tokens, D model dim, E experts, C capacity (slots per expert), R kept assignments.
"""

from __future__ import annotations

from torch import Tensor

from moelab.moe.decision import RoutingDecision
from moelab.moe.dispatch.base import DISPATCHERS
from moelab.moe.dispatch.grouping import combine, group_by_expert
from moelab.moe.experts import Experts


@DISPATCHERS.register("padded")
def padded_dispatch(x_TD: Tensor, decision: RoutingDecision, experts: Experts) -> Tensor:
    """``[T, D] → [T, D]``; equal to ``loop``."""
    grouping = group_by_expert(decision)
    if grouping.num_rows == 0:
        return x_TD.new_zeros(x_TD.shape)
    E, D = decision.num_experts, x_TD.shape[-1]
    max_load = int(grouping.tokens_per_expert_E.max())
    C = max(max_load, decision.capacity or 0)
    slot_R = grouping.expert_R * C + grouping.slot_R()
    x_RD = x_TD.index_select(0, grouping.token_R)
    x_ECD = x_RD.new_zeros(E * C, D).index_copy(0, slot_R, x_RD).view(E, C, D)
    out_ECD = experts.forward_padded(x_ECD)
    out_RD = out_ECD.reshape(E * C, D).index_select(0, slot_R)
    return combine(out_RD, grouping, decision, x_TD.shape[0])

"""``grouped_mm``: rows sorted by expert, then two ``F.grouped_mm`` calls for all experts.

The fast path on CUDA in bf16 (one kernel per projection, no host sync for group sizes) and
on CPU in bf16 for many small experts. Where ``F.grouped_mm`` cannot run (torch < 2.8, a row
stride that is not a multiple of 16 bytes, non-bf16 on CUDA) it falls back to the per-slice
loop of ``sorted``, so the backend is always correct.

Legend: T tokens, D model dim, E experts, R kept assignments (rows).
"""

from __future__ import annotations

from torch import Tensor

from moelab.moe.decision import RoutingDecision
from moelab.moe.dispatch.base import DISPATCHERS
from moelab.moe.dispatch.grouping import add_rows, combine, group_by_expert
from moelab.moe.experts import Experts, compute_dtype


@DISPATCHERS.register("grouped_mm")
def grouped_mm_dispatch(x_TD: Tensor, decision: RoutingDecision, experts: Experts) -> Tensor:
    """``[T, D] → [T, D]``; equal to ``loop``. Where the experts are narrower than the model (F < D, as in
    fine-grained MoE) the combine weight multiplies each row's activation before the down projection
    (linear, so the same sum): F values a row instead of D, and no ``[R, D]`` output kept for the weight's
    gradient; E64k8/h256 (F=256, D=512) forward+backward 1.06× (paired, bf16 weights and autocast)."""
    grouping = group_by_expert(decision)
    if grouping.num_rows == 0:
        return x_TD.new_zeros(x_TD.shape)
    x_RD = x_TD.index_select(0, grouping.token_R)
    if not experts.grouped_mm_supported(compute_dtype(x_TD), x_TD.device):
        return combine(experts(x_RD, grouping.tokens_per_expert_E.tolist()), grouping, decision, x_TD.shape[0])
    if experts.hidden < experts.d_model:  # fine-grained experts: weight the [R, F] activation, not the [R, D] output
        out_RD = experts.forward_grouped(x_RD, grouping.tokens_per_expert_E, decision.weight[grouping.assignment_R])
        return add_rows(out_RD, grouping, x_TD.shape[0])
    return combine(experts.forward_grouped(x_RD, grouping.tokens_per_expert_E), grouping, decision, x_TD.shape[0])

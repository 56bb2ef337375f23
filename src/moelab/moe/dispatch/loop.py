"""The reference dispatch: for each expert, gather its tokens, run it, add weighted outputs back.

Slow and obvious on purpose: every faster backend is tested for equality with it.

Legend: T tokens, D model dim, E experts, A assignments, n rows of one expert.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.moe.decision import RoutingDecision
from moelab.moe.dispatch.base import DISPATCHERS
from moelab.moe.experts import Experts


@DISPATCHERS.register("loop")
def loop_dispatch(x_TD: Tensor, decision: RoutingDecision, experts: Experts) -> Tensor:
    """``y_t = Σ_{kept a: token(a)=t} weight(a) · expert(a)(x_t)``; ``[T, D] → [T, D]``."""
    y_TD: Tensor | None = None
    for e in range(decision.num_experts):
        (idx_n,) = torch.nonzero((decision.expert == e) & decision.kept, as_tuple=True)
        if idx_n.numel() == 0:
            continue
        token_n = decision.token[idx_n]
        out_nD = experts.forward_expert(e, x_TD[token_n])
        weight_n1 = decision.weight[idx_n].unsqueeze(-1).to(out_nD.dtype)
        if y_TD is None:  # allocated in the experts' output dtype (bf16 under autocast)
            y_TD = out_nD.new_zeros(x_TD.shape)
        y_TD = y_TD.index_add(0, token_n, out_nD * weight_n1)
    return torch.zeros_like(x_TD) if y_TD is None else y_TD

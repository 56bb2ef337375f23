"""Unweighted top-k router (MoEfication, Zhang et al. 2022): the chosen experts are summed.

A MoEfied FFN is the dense FFN with its neurons split into experts; the dense output is the
*sum* of all experts, so the MoE output is the sum of the chosen ones: every kept assignment
has combine weight exactly 1. Selection is top-k of the router logits; the weight is written
``p / stop_gradient(p)`` (value 1) so a trained router still receives a gradient through it.
``scores`` are the softmax of the logits, for the balance losses and analysis.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from torch import Tensor

from moelab.moe.routers.base import ROUTERS, Router, Selection


@ROUTERS.register("topk_unweighted")
class TopKUnweightedRouter(Router):
    """Keep the K best experts per token with weight 1 each (MoEfication: sum of chosen experts)."""

    paper = "Zhang et al. 2022 (MoEfication)"
    formula = (
        "experts = TopK(x·W_g, K); `w = 1` per chosen expert (written `p/sg(p)` so the router still gets a gradient); `y = Σ_chosen f_e(x)`"
    )
    balancing = (
        "none needed (routers fitted to calibration activations by `moelab moefy`); `moe.aux_loss` if trained further"
    )

    def select(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Selection:
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.softmax(dim=-1)
        expert_TK = self.top_k_experts(logits_TE)
        p_TK = scores_TE.gather(1, expert_TK)
        return Selection(expert_TK, p_TK / p_TK.detach(), logits_TE, scores_TE)

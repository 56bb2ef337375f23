"""Softmax top-k router (Shazeer et al. 2017 without noise; Mixtral, Qwen-MoE; k=1 is Switch).

scores = softmax(x·W_g) over all E experts; each token keeps its K best experts. Combine
weights are the kept probabilities, renormalised to sum to 1 when ``renormalize`` (Mixtral,
OLMoE) or left as probabilities (Qwen-MoE with ``norm_topk_prob=False``, DeepSeek-V2), or a
softmax over the K kept logits when ``softmax_after_topk`` (top-k first, softmax after: equal
to renormalising in exact arithmetic, offered for configs that spell it that way).
``jitter_eps`` multiplies inputs by U(1-eps, 1+eps) in training (Switch).

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from moelab.moe.routers.base import ROUTERS, DecodeSpec, Router, Selection, softmax_topk_weights
from moelab.moe.routers.options import JitterOptions


@dataclass(frozen=True)
class TopKOptions(JitterOptions):
    renormalize: bool = True  # kept probabilities renormalised to sum to 1 (Mixtral) or left as they are (Qwen)
    softmax_after_topk: bool = False  # a softmax over the K kept logits instead of over all E


@ROUTERS.register("topk")
class TopKRouter(Router):
    """Softmax over E experts, keep the K best per token (k=1: Switch-style top-1)."""

    paper = "Shazeer et al. 2017; Mixtral (Jiang et al. 2024); Qwen-MoE"
    balancing = "`moe.aux_loss=load_balance` (Switch/GShard)"
    options_note = "`renormalize`: Mixtral, OLMoE; false: raw probabilities (Qwen, DeepSeek-V2); `softmax_after_topk`: top-k, then a softmax over the K kept logits; `jitter_eps`: inputs × U(1−ε, 1+ε), training only"
    Options = TopKOptions
    formula = "`p = softmax(x·W_g)`; experts = TopK(p, K); `w = p_kept / Σ p_kept`"

    def select(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Selection:
        logits_TE = self.logits(self.jitter(x_TD))
        scores_TE = logits_TE.softmax(dim=-1)
        expert_TK = self.top_k_experts(logits_TE)
        weight_TK = self.combine_weights(logits_TE.gather(1, expert_TK), expert_TK, scores_TE)
        return Selection(expert_TK, weight_TK, logits_TE, scores_TE)

    @property
    def weight_mode(self) -> str:
        o = self.options
        if o.softmax_after_topk:
            return "softmax_after_topk"
        return "renormalize" if o.renormalize else "probs"

    def combine_weights(self, kept_logits_TK: Tensor, expert_TK: Tensor, scores_TE: Tensor) -> Tensor:
        """``[T, K]`` weights of the kept experts: softmax over the kept logits, or their
        probabilities (renormalised to sum to 1 where configured)."""
        return softmax_topk_weights(kept_logits_TK, expert_TK, scores_TE, self.weight_mode)

    def decode_spec(self) -> DecodeSpec | None:
        """A softmax top-k in eval (no jitter) without forced balance; a subclass that changes the decision
        is not one unless it says so itself."""
        if type(self) is not TopKRouter or self.training or self.options.force_balanced:
            return None
        return DecodeSpec(self.top_k, self.weight_mode)

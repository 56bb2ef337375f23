"""Switch router (Fedus et al. 2021, "Switch Transformers", §2.1 and §2.4).

Each token goes to exactly one expert: ``p = softmax(x·W_r)``, expert = argmax p, combine
weight ``p_expert`` (not renormalised, so the router gets a gradient through the gate value).
In training the router input may be multiplied by uniform noise ``U(1-eps, 1+eps)``
(``moe.router.jitter_eps``; the paper's "selective precision" and jitter study), the same
operation as transformers' ``SwitchTransformersTop1Router``. The balance loss of the paper is
``moe.aux_loss=load_balance`` (with K=1 it is exactly the paper's ``α·E·Σ f_i·P_i``).

Legend: T tokens, D model dim, E experts, K top-k (= 1).
"""

from __future__ import annotations

from torch import Tensor

from moelab.config import ConfigError, MoEConfig
from moelab.moe.routers.base import ROUTERS, Router, Selection, round_robin_experts
from moelab.moe.routers.options import JitterOptions


@ROUTERS.register("switch")
class SwitchRouter(Router):
    """Top-1 softmax router with optional multiplicative input jitter in training (Switch Transformer)."""

    paper = "Fedus et al. 2021 (Switch Transformers)"
    balancing = "`load_balance` (`α·E·Σ f_i·P_i`), z-loss"
    options_note = "`jitter_eps`: inputs × U(1−ε, 1+ε), training only; needs `moe.top_k=1`"
    Options = JitterOptions
    formula = "`p = softmax(x·W_r)`; `e = argmax p`; `w = p_e`"

    @classmethod
    def validate(cls, cfg: MoEConfig) -> None:
        if cfg.top_k != 1:
            raise ConfigError(
                f"moe.top_k={cfg.top_k!r} is invalid: the 'switch' router sends each token to exactly one "
                "expert; set moe.top_k=1, or use moe.router.name='topk' for K > 1"
            )

    def select(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Selection:
        logits_TE = self.logits(self.jitter(x_TD))
        probs_TE = logits_TE.softmax(dim=-1)
        if self.options.force_balanced:
            expert_T1 = round_robin_experts(x_TD.shape[0], self.num_experts, 1, x_TD.device)
        else:
            expert_T1 = probs_TE.argmax(dim=-1, keepdim=True)  # argmax, as the paper and transformers break ties
        return Selection(expert_T1, probs_TE.gather(1, expert_T1), logits_TE, probs_TE)

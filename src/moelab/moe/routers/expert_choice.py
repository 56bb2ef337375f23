"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Experts pick tokens instead of tokens picking experts:

    S = softmax(x·W_g)  ([T, E], over experts),   G, I = TopK(Sᵀ, C)  (each expert's C best tokens)
    C = ceil(T · c / E),  c = moe.capacity_factor (or moe.top_k when it is null)

so every expert processes exactly C tokens (perfect balance by construction, no balance loss
needed) and a token gets zero, one or several experts. The combine weight of an assignment is
``S[t, e]``; ``rank`` is the token's place in expert e's pick list. The router bounds each
expert's load itself, so the layer's capacity policy is not applied on top.

Not causal: the choice for token t depends on every other token of the batch (and of later
positions), so a model trained this way cannot decode autoregressively with the same routing.
Config validation warns about it. Padding tokens are never preferred to real ones; a pick that
falls on padding (only when C exceeds the real tokens) is marked not kept.

Legend: T tokens, D model dim, E experts, C tokens per expert, A = E·C assignments.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from moelab.config import MoEConfig
from moelab.moe.decision import RoutingDecision
from moelab.moe.routers.base import ROUTERS, Router


class NonCausalRouterWarning(UserWarning):
    """The router's decision for a token depends on later tokens."""


def expert_choice_capacity(num_tokens: int, num_experts: int, c: float) -> int:
    """``C = min(T, ceil(T · c / E))``: tokens each expert takes."""
    if num_tokens == 0:
        return 0
    return min(num_tokens, max(1, math.ceil(num_tokens * c / num_experts)))


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert takes its top-C tokens by softmax score; tokens get 0..E experts (Zhou et al. 2022)."""

    paper = "Zhou et al. 2022 (expert choice routing)"
    formula = (
        "`S = softmax(x·W_g)`; each expert e keeps TopK(S[:, e], C) over tokens, `C = ceil(T·c/E)`, `c = moe.capacity_factor` (or `moe.top_k` when null); `w = S[t, e]`"
    )
    balancing = "balanced by construction (every expert takes exactly C tokens); tokens may get 0..E experts"
    options_note = "`moe.capacity_factor` (= c, the average experts per token); the layer's drop policy is not applied"
    causal_note = "a token's experts depend on the other tokens of the batch, later ones included (config validation warns)"
    causal_safe = False
    manages_capacity = True

    @classmethod
    def validate(cls, cfg: MoEConfig) -> None:
        # capacity_factor <= 0 is already rejected for every router by MoEConfig (moe.capacity_factor).
        warnings.warn(
            "moe.router.name='expert_choice' looks across the whole batch when choosing tokens: it is not "
            "causal, so autoregressive decoding cannot reproduce training-time routing",
            NonCausalRouterWarning,
            stacklevel=3,
        )

    @property
    def tokens_per_token(self) -> float:
        """c: the average number of experts per token."""
        cf = self.cfg.capacity_factor
        return float(self.top_k if cf is None else cf)

    def forward(
        self,
        x_TD: Tensor,
        batch_shape: tuple[int, int],
        token_ids_T: Tensor | None = None,
        token_mask_T: Tensor | None = None,
    ) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.softmax(dim=-1)
        C = expert_choice_capacity(T, E, self.tokens_per_token)
        pick_TE = scores_TE.detach()
        if token_mask_T is not None:  # padding only when nothing real is left
            pick_TE = pick_TE.masked_fill(~token_mask_T.bool().unsqueeze(-1), -1.0)
        token_EC = pick_TE.t().topk(C, dim=-1).indices
        token_A = token_EC.reshape(-1)
        expert_A = torch.arange(E, device=x_TD.device).repeat_interleave(C)
        kept_A = (
            torch.ones_like(token_A, dtype=torch.bool) if token_mask_T is None else token_mask_T.bool()[token_A]
        )
        return RoutingDecision(
            token=token_A,
            expert=expert_A,
            weight=scores_TE[token_A, expert_A],
            rank=torch.arange(C, device=x_TD.device).repeat(E),
            kept=kept_A,
            logits=logits_TE,
            scores=scores_TE,
            num_experts=E,
            batch_shape=batch_shape,
            token_mask=token_mask_T,
            capacity=C,
        )

"""Sigmoid routing with aux-loss-free bias balancing (DeepSeek-V3, Liu et al. 2024, §2.1.2; Wang et al. 2024).

    s = sigmoid(x·W_g)                                       ([T, E], fp32)
    choice = s + b                                           (b: per-expert bias, no gradient)
    group-limited (n_group > 1): group score = sum of the two best ``choice`` in each group;
        only the best ``topk_group`` groups stay selectable
    experts = TopK(choice, K);  w = s_e / Σ_kept s (renormalize) · routed_scaling_factor

The bias only decides *which* experts are chosen; weights come from the unbiased scores. After
each optimizer step the trainer's :class:`~moelab.moe.balancing.Balancer` calls
:meth:`update_bias` with that step's load: ``b_i += γ · sign(mean_load − load_i)``, raising the
bias of under-loaded experts. The sequence-wise balance loss of the paper (small α) is
``moe.seq_aux_coef`` (or ``moe.aux_loss=seq_aux``). Matches transformers'
``DeepseekV3TopkRouter`` (``e_score_correction_bias`` is our ``bias``); tested.

Legend: T tokens, D model dim, E experts, K top-k, G groups, E/G experts per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moelab.config import ConfigError, MoEConfig, check_field
from moelab.moe.routers.base import ROUTERS, Router, Selection
from moelab.moe.routers.options import RouterOptions

if TYPE_CHECKING:
    from moelab.moe.stats import LayerStats


def group_limited_mask(choice_TE: Tensor, n_group: int, topk_group: int) -> Tensor:
    """``[T, E]`` bool: experts inside each token's ``topk_group`` best groups.

    A group's score is the sum of its two best scores (one when groups have a single expert).
    """
    T, E = choice_TE.shape
    per_group = E // n_group
    grouped_TGn = choice_TE.view(T, n_group, per_group)
    group_score_TG = grouped_TGn.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    best_group = group_score_TG.topk(topk_group, dim=-1).indices
    group_mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_group, True)
    return group_mask_TG.unsqueeze(-1).expand(T, n_group, per_group).reshape(T, E)


@dataclass(frozen=True)
class SigmoidBiasOptions(RouterOptions):
    n_group: int = 1  # group-limited routing (DeepSeek-V3): experts split into n_group groups ...
    topk_group: int = 1  # ... of which the best topk_group groups are searched
    routed_scaling_factor: float = 1.0  # combine weights multiplied by this (DeepSeek-V3)
    renormalize: bool = True  # kept scores over their sum (DeepSeek's norm_topk_prob)
    bias_update_rate: float = 0.001  # aux-loss-free balancing step size (gamma)

    def __post_init__(self) -> None:
        check_field(self.n_group >= 1, "moe.router.n_group", self.n_group, "must be >= 1")
        check_field(1 <= self.topk_group <= self.n_group, "moe.router.topk_group", self.topk_group,
                    f"must be between 1 and moe.router.n_group={self.n_group}")  # fmt: skip
        check_field(self.routed_scaling_factor > 0, "moe.router.routed_scaling_factor", self.routed_scaling_factor,
                    "must be > 0")  # fmt: skip
        check_field(self.bias_update_rate >= 0, "moe.router.bias_update_rate", self.bias_update_rate, "must be >= 0")


@ROUTERS.register("sigmoid_bias")
class SigmoidBiasRouter(Router):
    """Sigmoid scores, selection by score + bias, bias balanced outside the gradient (DeepSeek-V3)."""

    paper = "DeepSeek-V3 (2024); Wang et al. 2024 (aux-loss-free balancing)"
    formula = (
        "`s = σ(x·W_g)`; experts = TopK(s + b, K) inside the best `topk_group` of `n_group` groups (group score = sum of its 2 best `s + b`); `w = s_e / Σ_kept s · routed_scaling_factor`"
    )
    balancing = (
        "`b_i += γ·sign(mean_load − load_i)` after each step (`Balancer`); optional sequence-wise loss `moe.seq_aux_coef` (small α)"
    )
    options_note = "`renormalize` is DeepSeek's `norm_topk_prob`; `bias_update_rate` is γ"
    learned_note = "+ bias `b` updated outside the gradient"

    bias: Tensor
    Options = SigmoidBiasOptions

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__(d_model, cfg)
        # A buffer, not a parameter: no gradient, no weight decay, but saved in checkpoints.
        self.register_buffer("bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    @classmethod
    def validate(cls, cfg: MoEConfig) -> None:
        r = cls.options_of(cfg)
        if cfg.num_experts % r.n_group:
            raise ConfigError(
                f"moe.router.n_group={r.n_group!r} is invalid: must divide moe.num_experts={cfg.num_experts}"
            )
        selectable = r.topk_group * (cfg.num_experts // r.n_group)
        if cfg.top_k > selectable:
            raise ConfigError(
                f"moe.top_k={cfg.top_k!r} is invalid: group-limited routing leaves only topk_group·E/n_group="
                f"{selectable} experts to choose from; raise moe.router.topk_group or lower moe.top_k"
            )

    def select(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Selection:
        r = self.options
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE.detach() + self.bias.float()
        if r.n_group > 1:
            allowed_TE = group_limited_mask(choice_TE, r.n_group, r.topk_group)
            choice_TE = choice_TE.masked_fill(~allowed_TE, float("-inf"))
        expert_TK = self.top_k_experts(choice_TE)
        weight_TK = scores_TE.gather(1, expert_TK)
        if r.renormalize:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return Selection(expert_TK, weight_TK * r.routed_scaling_factor, logits_TE, scores_TE)

    @torch.no_grad()
    def update_bias(self, stats: LayerStats) -> None:
        """Aux-loss-free balancing step: ``b_i += γ · sign(mean_load − load_i)`` (γ = bias_update_rate)."""
        load_E = stats.load.to(device=self.bias.device, dtype=torch.float32)
        self.bias += self.options.bias_update_rate * torch.sign(load_E.mean() - load_E)

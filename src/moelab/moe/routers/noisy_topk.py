"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", §2.1, App. A).

    H(x)_i = (x·W_g)_i + ε_i · softplus((x·W_noise)_i) · noise_std,   ε ~ N(0, 1) in training only
    G(x)   = softmax(KeepTopK(H(x), k))         (−∞ outside the top k, so a softmax over the kept)

The paper balances with two CV² losses (``moe.importance_coef``, ``moe.load_coef`` or
``moe.aux_loss=importance|load``): importance = Σ_x G(x), and a smooth, differentiable estimate
of the load that needs the clean logits, the noisy logits and the noise scale. Those travel in
:class:`NoisyRoutingDecision` (a RoutingDecision with three extra fields), so the losses stay
pure functions of the decision.

In eval mode ``H = x·W_g``: no noise. ``decision.logits`` are the clean logits ``x·W_g`` and
``decision.scores = softmax(H)`` over all E (the kept weights are these renormalised).

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import ConfigError, MoEConfig, check_field
from moelab.moe.decision import RoutingDecision
from moelab.moe.routers.base import ROUTERS, Router, Selection
from moelab.moe.routers.options import RouterOptions


@dataclass(frozen=True)
class NoisyRoutingDecision(RoutingDecision):
    """A RoutingDecision plus the evidence of the smooth load estimator (Shazeer et al. eq. 8-10).

    Attributes:
        noisy_logits: ``[T, E]`` H(x), what the top-k was taken over (= logits in eval).
        noise_std: ``[T, E]`` softplus(x·W_noise)·noise_std, the scale of the Gaussian noise.
        top_k: K.
    """

    noisy_logits: Tensor | None = None
    noise_std: Tensor | None = None
    top_k: int = 1

    def detach(self) -> NoisyRoutingDecision:
        base = super().detach()
        return replace(
            base,
            noisy_logits=None if self.noisy_logits is None else self.noisy_logits.detach(),
            noise_std=None if self.noise_std is None else self.noise_std.detach(),
        )


@dataclass(frozen=True)
class NoisySelection(Selection):
    """A selection plus H(x) (``noisy_logits_TE``, what the top-k was taken over) and the noise scale."""

    noisy_logits_TE: Tensor
    noise_std_TE: Tensor


@dataclass(frozen=True)
class NoisyTopKOptions(RouterOptions):
    noise_std: float = 1.0  # scale of the learned Gaussian noise on the logits (training only)

    def __post_init__(self) -> None:
        check_field(self.noise_std >= 0, "moe.router.noise_std", self.noise_std, "must be >= 0")


@ROUTERS.register("noisy_topk")
class NoisyTopKRouter(Router):
    """Learned Gaussian noise on the gate logits, keep top-k, softmax over the kept (Shazeer et al. 2017)."""

    paper = "Shazeer et al. 2017 (sparsely-gated MoE)"
    formula = "`H = x·W_g + ε·softplus(x·W_noise)·noise_std`, ε ~ N(0,1) in training; `w = softmax(KeepTopK(H, K))`"
    balancing = (
        "importance + load CV² losses (`moe.importance_coef`, `moe.load_coef`, or `moe.aux_loss=importance/load`)"
    )
    options_note = "`noise_std` scales the learned noise"
    smooth_load = True
    Options = NoisyTopKOptions

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__(d_model, cfg)
        self.noise = nn.Linear(d_model, cfg.num_experts, bias=False)

    @classmethod
    def validate(cls, cfg: MoEConfig) -> None:
        uses_load = cfg.aux_loss == "load" or cfg.load_coef > 0
        if uses_load and cfg.top_k >= cfg.num_experts:
            raise ConfigError(
                f"moe.top_k={cfg.top_k!r} is invalid: the smooth load loss needs top_k < moe.num_experts="
                f"{cfg.num_experts} (with K = E every expert is always chosen)"
            )
        noise_std = cls.options_of(cfg).noise_std
        if uses_load and noise_std <= 0:
            raise ConfigError(
                f"moe.router.noise_std={noise_std!r} is invalid: the smooth load loss divides by the "
                "noise scale; use noise_std > 0 or drop the load loss"
            )

    def noise_scale(self, x_TD: Tensor) -> Tensor:
        """``[T, E]`` fp32 softplus(x·W_noise) · noise_std."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            raw_TE = F.linear(x_TD.float(), self.noise.weight.float())
        return F.softplus(raw_TE) * self.options.noise_std

    def select(self, x_TD: Tensor, token_ids_T: Tensor | None) -> NoisySelection:
        clean_TE = self.logits(x_TD)
        std_TE = self.noise_scale(x_TD)
        if self.training and self.options.noise_std > 0:
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * std_TE
        else:
            noisy_TE = clean_TE
        expert_TK = self.top_k_experts(noisy_TE)
        weight_TK = noisy_TE.gather(1, expert_TK).softmax(dim=-1)
        return NoisySelection(expert_TK, weight_TK, clean_TE, noisy_TE.softmax(dim=-1), noisy_TE, std_TE)

    def decide(self, s: Selection, batch_shape: tuple[int, int], token_mask_T: Tensor | None) -> RoutingDecision:
        """The decision plus the evidence the smooth load loss reads (:class:`NoisyRoutingDecision`)."""
        assert isinstance(s, NoisySelection)
        base = super().decide(s, batch_shape, token_mask_T)
        return NoisyRoutingDecision(
            **{f: getattr(base, f) for f in RoutingDecision.__dataclass_fields__},
            noisy_logits=s.noisy_logits_TE,
            noise_std=s.noise_std_TE,
            top_k=self.top_k,
        )

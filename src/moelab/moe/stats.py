"""RoutingStats: per-layer load statistics of one step, for logging, health checks and balancing.

Computed once from the model output's routing decisions (no re-derivation from logits), on
valid (non-padding) tokens, without gradient.

Legend: E experts, T tokens, A assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.moe.decision import RoutingDecision
from moelab.moe.losses import valid_tokens


@dataclass(frozen=True)
class LayerStats:
    """One MoE layer's routing in one step.

    ``load`` counts the router's choices before drops (what balancing acts on);
    ``kept_load`` what experts actually received.
    """

    load: Tensor  # [E] long, assignments per expert before drops (valid tokens only)
    kept_load: Tensor  # [E] long, after capacity drops
    drop_rate: float  # dropped / all valid assignments
    mean_top1_prob: float  # mean over valid tokens of the largest router score
    num_tokens: int = 0  # valid tokens routed (0 = unknown)

    @property
    def load_fraction(self) -> Tensor:
        """``[E]`` share of assignments per expert (sums to 1)."""
        total = self.load.sum().clamp_min(1)
        return self.load.double() / total

    @property
    def max_load(self) -> float:
        """Largest expert share (1/E at perfect balance, 1 at collapse)."""
        return float(self.load_fraction.max())

    @property
    def token_share(self) -> Tensor:
        """``[E]`` share of valid tokens that chose each expert (1 = every token; sums to K)."""
        if self.num_tokens <= 0:
            return self.load_fraction
        return self.load.double() / self.num_tokens

    @property
    def max_over_mean(self) -> float:
        return self.max_load * self.load.numel()

    @property
    def max_violation(self) -> float:
        """MaxVio of the loss-free balancing paper (Wang et al. 2024, eq. 7):
        ``(max_i load_i − mean load) / mean load``; 0 = balanced, E − 1 = every choice on one expert."""
        return self.max_over_mean - 1.0

    @property
    def load_entropy(self) -> float:
        """Entropy of the load distribution normalised by log E: 1 = balanced, 0 = one expert."""
        p = self.load_fraction
        E = p.numel()
        if E <= 1:
            return 1.0
        h = -(p[p > 0] * p[p > 0].log()).sum()
        return float(h / math.log(E))

    def __add__(self, other: LayerStats) -> LayerStats:
        """Stats of two micro-batches together (loads add; rates are weighted by their counts)."""
        n_self, n_other = int(self.load.sum()), int(other.load.sum())
        n = max(n_self + n_other, 1)
        tokens = self.num_tokens + other.num_tokens
        top1 = (
            (self.mean_top1_prob * self.num_tokens + other.mean_top1_prob * other.num_tokens) / tokens
            if tokens > 0
            else (self.mean_top1_prob + other.mean_top1_prob) / 2
        )
        return LayerStats(
            load=self.load + other.load,
            kept_load=self.kept_load + other.kept_load,
            drop_rate=(self.drop_rate * n_self + other.drop_rate * n_other) / n,
            mean_top1_prob=top1,
            num_tokens=tokens,
        )

    @classmethod
    def from_decision(cls, decision: RoutingDecision) -> LayerStats:
        with torch.no_grad():
            valid_A = valid_tokens(decision)[decision.token]
            E = decision.num_experts
            load = torch.bincount(decision.expert[valid_A], minlength=E)
            kept = valid_A & decision.kept
            kept_load = torch.bincount(decision.expert[kept], minlength=E)
            n = int(valid_A.sum())
            drop = 0.0 if n == 0 else 1.0 - int(kept.sum()) / n
            top1 = decision.scores.max(dim=-1).values[valid_tokens(decision)]
            mean_top1 = float(top1.mean()) if top1.numel() else 0.0
        return cls(
            load=load.cpu(),
            kept_load=kept_load.cpu(),
            drop_rate=drop,
            mean_top1_prob=mean_top1,
            num_tokens=int(valid_tokens(decision).sum()),
        )


@dataclass(frozen=True)
class RoutingStats:
    """Stats of every MoE layer in one step, keyed by layer index."""

    layers: dict[int, LayerStats]

    @classmethod
    def from_routing(cls, routing: dict[int, RoutingDecision] | None) -> RoutingStats:
        return cls({i: LayerStats.from_decision(d) for i, d in (routing or {}).items()})

    def __add__(self, other: RoutingStats) -> RoutingStats:
        """Accumulate micro-batches: layers present in both are added, others kept as they are."""
        layers = dict(self.layers)
        for i, s in other.layers.items():
            layers[i] = layers[i] + s if i in layers else s
        return RoutingStats(layers)

    def load_shares(self) -> dict[int, list[float]]:
        """Per layer, each expert's share of the assignments (what an evaluation reports)."""
        return {i: s.load_fraction.tolist() for i, s in self.layers.items()}

    def summary(self) -> dict[str, float]:
        """Scalars to log: drop rate, max expert share and load entropy averaged over layers."""
        if not self.layers:
            return {}
        layers = list(self.layers.values())
        n = len(layers)
        return {
            "drop_rate": sum(s.drop_rate for s in layers) / n,
            "max_expert_load": max(s.max_load for s in layers),
            "load_entropy": sum(s.load_entropy for s in layers) / n,
            "mean_top1_prob": sum(s.mean_top1_prob for s in layers) / n,
        }

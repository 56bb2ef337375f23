"""MoELayer: router → capacity policy → dispatch backend → (+ shared experts).

Legend: B batch, S sequence, T = B·S tokens, D model dim, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from moelab.config import MoEConfig
from moelab.moe.capacity import apply_capacity
from moelab.moe.decision import RoutingDecision
from moelab.moe.dispatch import DISPATCHERS
from moelab.moe.experts import Experts
from moelab.moe.losses import router_loss
from moelab.moe.routers import build_router
from moelab.moe.validate import check_moe_config
from moelab.nn.ffn import DenseMLP, GatedDenseMLP


@dataclass
class MoEOutput:
    """What one MoE layer returns besides its output: the decision and its raw aux losses."""

    y: Tensor  # [B, S, D]
    decision: RoutingDecision
    losses: dict[str, Tensor]  # unweighted, by name (e.g. "load_balance", "z_loss")


class MoELayer(nn.Module):
    """A mixture-of-experts feed-forward block with optional always-on shared experts."""

    def __init__(self, d_model: int, cfg: MoEConfig, activation: str) -> None:
        super().__init__()
        self.cfg = cfg = check_moe_config(cfg)  # names and router options, against what exists
        self.router = build_router(d_model, cfg)
        self.experts = Experts(cfg.num_experts, d_model, cfg.expert_hidden, activation)
        self.shared = (
            (GatedDenseMLP if cfg.shared_gate else DenseMLP)(  # gated: Qwen2-MoE's shared expert
                d_model, cfg.num_shared_experts * cfg.shared_expert_hidden, activation
            )
            if cfg.num_shared_experts > 0
            else None
        )
        self.dispatch = DISPATCHERS[cfg.dispatch]

    def loss_weights(self) -> dict[str, float]:
        """Coefficient of each aux loss this layer reports (``MoEConfig.loss_coefs``)."""
        return self.cfg.loss_coefs()

    def route(
        self, x_TD: Tensor, batch_shape: tuple[int, int], token_ids_T: Tensor | None, token_mask_T: Tensor | None
    ) -> RoutingDecision:
        """Router decision with capacity drops applied (unless the router bounds loads itself)."""
        decision = self.router(x_TD, batch_shape, token_ids_T=token_ids_T, token_mask_T=token_mask_T)
        if self.router.manages_capacity:
            return decision
        c = self.cfg
        return apply_capacity(decision, c.capacity_factor, c.drop_policy, c.top_k, c.capacity_scope, c.expert_capacity)

    def forward(
        self, x_BSD: Tensor, token_ids_BS: Tensor | None = None, token_mask_BS: Tensor | None = None
    ) -> MoEOutput:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        token_ids_T = None if token_ids_BS is None else token_ids_BS.reshape(-1)
        token_mask_T = None if token_mask_BS is None else token_mask_BS.reshape(-1).bool()
        decision = self.route(x_TD, (B, S), token_ids_T, token_mask_T)
        y_TD = self.dispatch(x_TD, decision, self.experts)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        losses = {name: router_loss(name)(decision) for name in self.loss_weights()}
        return MoEOutput(y=y_TD.view(B, S, D), decision=decision, losses=losses)

"""QuantExperts: routed experts with weight-only int8/int4 weights, same interface as Experts.

Keeps :class:`moelab.moe.experts.Experts`' contract, ``forward_expert(e, x_nD)`` and
``forward(x_RD, tokens_per_expert_E)``, so the MoE layer and every dispatch backend that
calls these work unchanged. Each expert's two matrices are a :class:`QuantLinear`
(``up[e]``: ``[m·F, D]``, ``down[e]``: ``[D, F]``, the per-expert slices of ``w_up``/``w_down``):
a token's step reads only its experts' bytes, and nothing is gathered or copied per call.

Legend: E experts, D model dim, F expert hidden, R routed rows, n rows of one expert.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.errors import UserError
from moelab.moe.experts import Experts, PerExpertModule, activate, up_multiplier
from moelab.quant.linear import QuantLinear


class NoStackedWeightsError(UserError, AttributeError):
    """Code that reads ``experts.w_up`` / ``w_down`` met quantized experts.

    A UserError so the CLI prints one actionable line; an AttributeError so ``hasattr`` and
    ``getattr(..., default)`` still answer "no such attribute".
    """


class QuantExperts(PerExpertModule):
    """E quantized feed-forward experts (inference only: weights are buffers, not parameters)."""

    def __init__(
        self, num_experts: int, d_model: int, hidden: int, activation: str, bits: int, group_size: int = 32
    ) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.hidden, self.activation = num_experts, d_model, hidden, activation
        self.bits, self.group_size = bits, group_size
        m = up_multiplier(activation)
        self.up = nn.ModuleList(QuantLinear(d_model, m * hidden, bits, group_size) for _ in range(num_experts))
        self.down = nn.ModuleList(QuantLinear(hidden, d_model, bits, group_size) for _ in range(num_experts))

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts, bits: int, group_size: int = 32) -> QuantExperts:
        """Quantize each expert's slice of the stacked ``w_up_EHD`` / ``w_down_EDF``."""
        q = cls(experts.num_experts, experts.d_model, experts.hidden, experts.activation, bits, group_size)
        for e in range(experts.num_experts):
            q.up[e] = QuantLinear.from_weight(experts.w_up[e].detach(), bits, group_size)
            q.down[e] = QuantLinear.from_weight(experts.w_down[e].detach(), bits, group_size)
        return q

    def __getattr__(self, name: str):
        if name in ("w_up", "w_down"):
            raise NoStackedWeightsError(
                f"quantized experts (int{self.bits}) have no stacked {name} tensor: this path (e.g. expert "
                "parallel or grouped-matmul dispatch) needs full-precision experts; use the unquantized "
                "checkpoint, or quantize with a scope that leaves the experts alone"
            )
        return super().__getattr__(name)

    def forward_expert(self, e: int, x_nD: Tensor) -> Tensor:
        """One expert on its rows: ``[n, D] → [n, D]``."""
        return self.down[e](activate(self.up[e](x_nD), self.activation))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, "
            f"activation={self.activation}, bits={self.bits}{group}"
        )

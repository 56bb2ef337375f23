"""Routed experts as stacked weight tensors.

Layout follows ``nn.Linear`` (and transformers' Mixtral ``gate_up_proj``/``down_proj``), so
conversion is a reshape, not a transpose:
- ``w_up_EHD``: ``[E, m·F, D]`` with m = 2 for SwiGLU (gate rows first, then up rows) or 1 for GELU.
- ``w_down_EDF``: ``[E, D, F]``.

Experts know nothing of routing: they take rows already grouped by expert and the count of
rows per expert, and return one output row per input row.

Legend: E experts, D model dim, F expert hidden, R routed rows (kept assignments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def activate(h: Tensor, activation: str) -> Tensor:
    """SwiGLU: ``silu(gate) · up`` over the two halves of ``h``; GEGLU-tanh (T5 v1.1):
    ``gelu_tanh(gate) · up``; ReLU (T5 v1.0, Switch): ``relu(h)``; GELU: ``gelu(h)``."""
    if activation in GATED:
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh")) * up
    return F.relu(h) if activation == "relu" else F.gelu(h)


GATED = ("swiglu", "geglu_tanh")  # gate rows then up rows in w_up


def up_multiplier(activation: str) -> int:
    return 2 if activation in GATED else 1


class Experts(nn.Module):
    """E feed-forward experts with stacked weights."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.d_model = d_model
        self.hidden = hidden
        self.activation = activation
        m = up_multiplier(activation)
        self.w_up = nn.Parameter(torch.empty(num_experts, m * hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert initialised like an ``nn.Linear`` of its shape (uniform ±1/sqrt(fan_in))."""
        self.w_up.uniform_(-self.d_model**-0.5, self.d_model**-0.5)
        self.w_down.uniform_(-self.hidden**-0.5, self.hidden**-0.5)

    def forward_expert(self, e: int, x_nD: Tensor) -> Tensor:
        """One expert on its rows: ``[n, D] → [n, D]`` (the obvious reference)."""
        return F.linear(activate(F.linear(x_nD, self.w_up[e]), self.activation), self.w_down[e])

    def forward(self, x_RD: Tensor, tokens_per_expert_E: list[int]) -> Tensor:
        """Rows grouped by expert (``tokens_per_expert_E`` rows for each, in order) → ``[R, D]``.

        Weights are unbound once and rows split once: indexing ``w[e]`` per expert under
        autograd makes every backward build a full-size zero gradient (shared/PERFORMANCE-NOTES).
        """
        outs = []
        pieces = x_RD.split(tokens_per_expert_E)
        for x_nD, w_up, w_down, n in zip(pieces, self.w_up.unbind(0), self.w_down.unbind(0), tokens_per_expert_E):
            if n == 0:
                continue
            outs.append(F.linear(activate(F.linear(x_nD, w_up), self.activation), w_down))
        if not outs:
            return x_RD.new_zeros(0, self.d_model)
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, activation={self.activation}"

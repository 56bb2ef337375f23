"""The dense feed-forward block (SwiGLU, GEGLU-tanh, ReLU or GELU, erf or tanh), also used for shared experts.

Weights in ``nn.Linear`` layout: ``w_up`` ``[m·F, D]`` (gated kinds: gate rows, then up rows; m = 2)
and ``w_down`` ``[D, F]``, the same per-expert layout as :class:`moelab.moe.experts.Experts`, so
a dense FFN can be copied into an expert (upcycling) without reshaping.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn.activations import activate, up_multiplier


class DenseMLP(nn.Module):
    def __init__(
        self, d_model: int, hidden: int, activation: str, bias: bool = False, gelu_approx: str = "none"
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.activation = activation
        self.gelu_approx = gelu_approx
        self.w_up = nn.Linear(d_model, up_multiplier(activation) * hidden, bias=bias)
        self.w_down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] → [..., D]``."""
        h = self.w_up(x)
        # tanh-approximated GELU (GPT-2's gelu_new) is a dense-only option; experts use ``activate``.
        if self.activation == "gelu" and self.gelu_approx == "tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = activate(h, self.activation)
        return self.w_down(h)


class GatedDenseMLP(DenseMLP):
    """A dense FFN whose output is scaled per token by ``sigmoid(x · gate)`` (Qwen2-MoE's shared expert).

    ``gate`` is ``[1, D]``: one scalar gate per token, learned, in (0, 1).
    """

    def __init__(self, d_model: int, hidden: int, activation: str, bias: bool = False) -> None:
        super().__init__(d_model, hidden, activation, bias=bias)
        self.gate = nn.Linear(d_model, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(x).sigmoid() * super().forward(x)

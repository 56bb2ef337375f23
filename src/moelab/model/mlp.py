"""The dense feed-forward block (SwiGLU or GELU), also used for shared experts.

Weights in ``nn.Linear`` layout: ``w_up`` ``[m·F, D]`` (SwiGLU: gate rows, then up rows; m = 2)
and ``w_down`` ``[D, F]``, the same per-expert layout as :class:`moelab.moe.experts.Experts`, so
a dense FFN can be copied into an expert (upcycling) without reshaping.
"""

from __future__ import annotations

from torch import Tensor, nn

from moelab.moe.experts import activate, up_multiplier


class DenseMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, activation: str, bias: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.activation = activation
        self.w_up = nn.Linear(d_model, up_multiplier(activation) * hidden, bias=bias)
        self.w_down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] → [..., D]``."""
        return self.w_down(activate(self.w_up(x), self.activation))

"""FFN activations shared by dense FFNs and experts: SwiGLU, GEGLU-tanh, ReLU, GELU, and SwiGLU with a
memory-lean backward. ``w_up`` rows of gated kinds are gate rows, then up rows (``up_multiplier`` = 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def activate(h: Tensor, activation: str) -> Tensor:
    """SwiGLU: ``silu(gate) · up`` over the two halves of ``h``; GEGLU-tanh (T5 v1.1):
    ``gelu_tanh(gate) · up``; ReLU (T5 v1.0, Switch): ``relu(h)``; GELU: ``gelu(h)``."""
    if activation in GATED:
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh")) * up
    return F.relu(h) if activation == "relu" else F.gelu(h)


GATED = ("swiglu", "geglu_tanh")  # gate rows then up rows in w_up


class _SwiGLURecompute(torch.autograd.Function):
    """``silu(gate) · up`` that saves only its input ``h = [gate | up]`` for the backward.

    Why: plain autograd also keeps ``silu(gate)`` (``[R, F]``), a quarter of an expert's
    activation memory (h: 2F, silu: F, the down projection's input: F per row); recomputing it
    in the backward costs one elementwise op. The gate gradient uses ATen's fused
    ``silu_backward``.
    """

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        d_up = grad * F.silu(gate)
        return torch.cat([d_gate, d_up], dim=-1)


def activate_lean(h: Tensor, activation: str) -> Tensor:
    """:func:`activate` with the memory-lean SwiGLU backward (same values and gradients)."""
    if activation == "swiglu" and torch.is_grad_enabled() and h.requires_grad:
        return _SwiGLURecompute.apply(h)
    return activate(h, activation)


def up_multiplier(activation: str) -> int:
    return 2 if activation in GATED else 1


__all__ = ["GATED", "activate", "activate_lean", "up_multiplier"]

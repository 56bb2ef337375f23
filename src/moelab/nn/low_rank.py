"""A LoRA adapter: the low-rank update ``ΔW = scale · B A`` of a frozen weight, applied beside it.

Why beside and not merged into the weight: a LoRA run over a bf16 release keeps its base in bf16,
and ``W + ΔW`` rounded to bf16 loses every update smaller than W's last bit (a relative 2⁻⁹): early
in training that is all of them, so the forward pass would not see what the optimizer learned.
Computed as its own path, ``x Aᵀ Bᵀ`` keeps its own precision (relative to itself) and only its
result meets the base path's output, where rounding varies token by token instead of erasing the
update everywhere. It is also what keeps memory at the weights' size: the base's matmul saves the
frozen weight itself for backward, never a merged copy of it, and the input it saves serves this
path too.

Shapes: a plain weight ``[out, in]`` has ``A: [r, in]``, ``B: [out, r]``; stacked expert weights
``[E, out, in]`` have one adapter per expert, ``A: [E, r, in]``, ``B: [E, out, r]``. ``B`` starts at
zero, so a fresh adapter changes nothing.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn.matmul_dtype import compute_dtype

LOW_PRECISION = (torch.bfloat16, torch.float16)


class LowRank(nn.Module):
    """``x ↦ scale · (x Aᵀ) Bᵀ`` for a weight of shape ``[..., out, in]`` (leading dims: one adapter each).

    ``A``/``B`` are fp32 beside a bf16/fp16 weight (``KEEP_FP32``: loaders keep them so): AdamW updates
    them in fp32; the update runs in the base path's dtype."""

    KEEP_FP32 = True  # moelab.model.materialize.cast_on_meta leaves these parameters fp32

    def __init__(self, weight: Tensor, rank: int, scale: float) -> None:
        super().__init__()
        *lead, out_dim, in_dim = weight.shape
        rank = min(rank, out_dim, in_dim)
        self.scale = scale
        # A as nn.Linear's default init (Kaiming-uniform over fan_in = in); B zero: ΔW = 0 at the start
        bound = 1.0 / math.sqrt(in_dim)
        dtype = torch.float32 if weight.dtype in LOW_PRECISION else weight.dtype
        like = {"dtype": dtype, "device": weight.device}  # meta when a checkpoint is streamed in
        self.lora_A = nn.Parameter(torch.empty(*lead, rank, in_dim, **like).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(*lead, out_dim, rank, **like))

    def _fp32(self) -> contextlib.AbstractContextManager[None]:
        kind = self.lora_A.device.type  # meta (a checkpoint streamed in) has no autocast
        return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext()

    def delta(self) -> Tensor:
        """``scale · B A``: ``[..., out, in]`` in the adapter's dtype (for merging)."""
        with self._fp32():
            return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x_nI: Tensor, e: int | None = None) -> Tensor:
        """``scale · x Aᵀ Bᵀ``: ``[..., in] → [..., out]`` with expert ``e``'s adapter (stacked) or the only one.

        Computed in the base path's dtype (autocast's, else the input's): the input the base matmul saved
        for backward serves this path too, and only ``[n, r]`` and the adapters' cast copies are added."""
        A, B = (self.lora_A, self.lora_B) if e is None else (self.lora_A[e], self.lora_B[e])
        dtype = compute_dtype(x_nI)
        return F.linear(F.linear(x_nI.to(dtype), A.to(dtype)), B.to(dtype)) * self.scale

    def grouped(self, x_RI: Tensor, rows_per_expert: list[int]) -> Tensor:
        """Rows grouped by expert (``rows_per_expert`` each, in order) → ``[R, out]``, each through its expert's adapter."""
        pieces = x_RI.split(rows_per_expert)
        outs = [self(x_nI, e) for e, x_nI in enumerate(pieces) if x_nI.shape[0] > 0]
        return torch.cat(outs) if outs else x_RI.new_zeros(0, self.lora_B.shape[-2])

    def padded(self, x_ECI: Tensor) -> Tensor:
        """A capacity buffer ``[E, C, in] → [E, C, out]`` (padding rows stay zero)."""
        dtype = compute_dtype(x_ECI)
        A_EIr, B_ErO = self.lora_A.to(dtype).transpose(1, 2), self.lora_B.to(dtype).transpose(1, 2)
        return torch.bmm(torch.bmm(x_ECI.to(dtype), A_EIr), B_ErO) * self.scale


__all__ = ["LOW_PRECISION", "LowRank"]

"""Routed experts as stacked weight tensors.

Layout follows ``nn.Linear`` (and transformers' Mixtral ``gate_up_proj``/``down_proj``), so
conversion is a reshape, not a transpose:
- ``w_up_EHD``: ``[E, m·F, D]`` with m = 2 for SwiGLU (gate rows first, then up rows) or 1 for GELU.
- ``w_down_EDF``: ``[E, D, F]``.

Experts know nothing of routing: they take rows already grouped by expert and the count of
rows per expert, and return one output row per input row.

Besides the per-expert reference (``forward_expert``) and the loop over contiguous slices
(``forward``), two batched forms serve the faster dispatch backends: ``forward_grouped``
(``F.grouped_mm`` over rows grouped by expert) and ``forward_padded`` (``bmm`` over a
capacity buffer ``[E, C, D]``). All four compute the same function.

Legend: E experts, D model dim, F expert hidden, R routed rows (kept assignments), C capacity
(rows per expert in a padded buffer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn.activations import activate, activate_lean, up_multiplier
from moelab.nn.low_rank import LowRank
from moelab.nn.matmul_dtype import compute_dtype


def grouped_mm_available() -> bool:
    """``F.grouped_mm`` exists in this torch (2.8+)."""
    return hasattr(F, "grouped_mm")


class PerExpertModule(nn.Module):
    """Experts known only through ``forward_expert(e, x_nD)`` (quantized, prepacked, offloaded):
    the batched forms every dispatch backend calls, built from it one expert at a time.

    Subclasses set ``num_experts`` and ``d_model`` and implement ``forward_expert``.
    """

    num_experts: int
    d_model: int

    def forward_expert(self, e: int, x_nD: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x_RD: Tensor, tokens_per_expert_E: list[int]) -> Tensor:
        """Rows grouped by expert (``tokens_per_expert_E`` rows each, in order) → ``[R, D]``."""
        outs = [
            self.forward_expert(e, x_nD)
            for e, (x_nD, n) in enumerate(zip(x_RD.split(tokens_per_expert_E), tokens_per_expert_E))
            if n > 0
        ]
        return torch.cat(outs, dim=0) if outs else x_RD.new_zeros(0, self.d_model)

    def grouped_mm_supported(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Never: grouped matmuls need stacked full-precision weights; the grouped_mm and auto
        backends then take their per-expert path, which calls :meth:`forward`."""
        return False

    def forward_padded(self, x_ECD: Tensor) -> Tensor:
        """A capacity buffer ``[E, C, D] → [E, C, D]`` one expert at a time (the ``padded``
        backend); padding rows are zeros in and out (no biases)."""
        return torch.stack([self.forward_expert(e, x_CD) for e, x_CD in enumerate(x_ECD.unbind(0))])


class Experts(nn.Module):
    """E feed-forward experts with stacked weights.

    ``lora_up``/``lora_down`` (:class:`~moelab.nn.low_rank.LowRank`, set by ``moelab.model.lora``) add
    each expert's low-rank update beside its frozen weights in every form below; None without LoRA."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.d_model = d_model
        self.hidden = hidden
        self.activation = activation
        m = up_multiplier(activation)
        self.w_up = nn.Parameter(torch.empty(num_experts, m * hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.lora_up: LowRank | None = None
        self.lora_down: LowRank | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert initialised like an ``nn.Linear`` of its shape (uniform ±1/sqrt(fan_in))."""
        self.w_up.uniform_(-self.d_model**-0.5, self.d_model**-0.5)
        self.w_down.uniform_(-self.hidden**-0.5, self.hidden**-0.5)

    @property
    def adapted(self) -> bool:
        """Whether LoRA adapters sit beside the weights (``moelab.model.lora``)."""
        return self.lora_up is not None or self.lora_down is not None

    def forward_expert(self, e: int, x_nD: Tensor) -> Tensor:
        """One expert on its rows: ``[n, D] → [n, D]`` (the obvious reference)."""
        if self.adapted:
            return self._adapted_expert(e, x_nD, self.w_up[e], self.w_down[e])
        return F.linear(activate(F.linear(x_nD, self.w_up[e]), self.activation), self.w_down[e])

    def _adapted_expert(self, e: int, x_nD: Tensor, w_up_HD: Tensor, w_down_DF: Tensor) -> Tensor:
        """Expert ``e`` with LoRA: each projection plus its low-rank update."""
        h = F.linear(x_nD, w_up_HD)
        h = h + self.lora_up(x_nD, e) if self.lora_up is not None else h
        a = activate(h, self.activation)
        y = F.linear(a, w_down_DF)
        return y + self.lora_down(a, e) if self.lora_down is not None else y

    def forward(self, x_RD: Tensor, tokens_per_expert_E: list[int]) -> Tensor:
        """Rows grouped by expert (``tokens_per_expert_E`` rows for each, in order) → ``[R, D]``.

        Weights are unbound once and rows split once: indexing ``w[e]`` per expert under
        autograd makes every backward build a full-size zero gradient (shared/PERFORMANCE-NOTES).
        """
        outs = []
        pieces = x_RD.split(tokens_per_expert_E)
        weights = zip(self.w_up.unbind(0), self.w_down.unbind(0))
        for e, (x_nD, (w_up, w_down), n) in enumerate(zip(pieces, weights, tokens_per_expert_E)):
            if n == 0:
                continue
            if self.adapted:
                outs.append(self._adapted_expert(e, x_nD, w_up, w_down))
            else:
                outs.append(F.linear(activate_lean(F.linear(x_nD, w_up), self.activation), w_down))
        if not outs:
            return x_RD.new_zeros(0, self.d_model)
        return torch.cat(outs, dim=0)

    def grouped_mm_supported(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether ``forward_grouped`` can run: ``F.grouped_mm`` needs every row stride to be a
        multiple of 16 bytes (D and F), and on CUDA bf16 operands."""
        if not grouped_mm_available():
            return False
        size = torch.empty((), dtype=dtype).element_size()
        if (self.d_model * size) % 16 or (self.hidden * size) % 16:
            return False
        return device.type == "cpu" or dtype == torch.bfloat16

    def forward_grouped(self, x_RD: Tensor, tokens_per_expert_E: Tensor, weight_R: Tensor | None = None) -> Tensor:
        """Rows grouped by expert → ``[R, D]`` with two ``F.grouped_mm`` calls; with ``weight_R`` each row's
        output is multiplied by its weight (the combine weight).

        Inputs and weights are cast to the compute dtype (autocast's, where on) because
        ``grouped_mm`` is not autocast-aware; offsets are int32 cumulative row counts. Why the weight
        goes in here: the down projection is linear, so ``w · down(a) = down(w · a)``, and weighting the
        activation ``[R, F]`` instead of the output ``[R, D]`` multiplies F instead of D values per row
        and saves no ``[R, D]`` output for the weight's gradient (the activation is saved anyway).
        """
        dtype = compute_dtype(x_RD)
        offs_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
        w_up_EDH = self.w_up.to(dtype).transpose(1, 2)
        w_down_EFD = self.w_down.to(dtype).transpose(1, 2)
        h_RH = F.grouped_mm(x_RD.to(dtype).contiguous(), w_up_EDH, offs=offs_E)
        rows = tokens_per_expert_E.tolist() if self.adapted else []
        if self.lora_up is not None:
            h_RH = h_RH + self.lora_up.grouped(x_RD, rows).to(dtype)
        a_RF = activate_lean(h_RH, self.activation)
        if weight_R is not None:
            a_RF = a_RF * weight_R.unsqueeze(-1).to(a_RF.dtype)
        a_RF = a_RF.contiguous()
        y_RD = F.grouped_mm(a_RF, w_down_EFD, offs=offs_E)
        return y_RD + self.lora_down.grouped(a_RF, rows).to(dtype) if self.lora_down is not None else y_RD

    def forward_padded(self, x_ECD: Tensor) -> Tensor:
        """A capacity buffer ``[E, C, D] → [E, C, D]`` with two batched matmuls (padding rows
        are zeros in and come out as zeros for SwiGLU/GELU without bias)."""
        h_ECH = torch.bmm(x_ECD, self.w_up.transpose(1, 2))
        if self.lora_up is not None:
            h_ECH = h_ECH + self.lora_up.padded(x_ECD).to(h_ECH.dtype)
        a_ECF = activate_lean(h_ECH, self.activation)
        y_ECD = torch.bmm(a_ECF, self.w_down.transpose(1, 2))
        return y_ECD + self.lora_down.padded(a_ECF).to(y_ECD.dtype) if self.lora_down is not None else y_ECD

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, activation={self.activation}"

"""QuantLinear: a drop-in, inference-only replacement for ``nn.Linear`` with int8/int4 weights.

Buffers (what ``state_dict`` holds; safetensors-friendly, device-independent):
- int8: ``qweight`` int8 ``[N, Kp]``, ``scales`` ``[N]``.
- int4: ``qweight`` uint8 ``[Np, Kp/2]`` holding plain nibbles (column 2j in the low nibble of
  byte j, 2j+1 in the high one) and ``scales_zeros`` ``[Kp/group, Np, 2]``.
- ``bias`` ``[N]`` when the layer had one.

In memory ``qweight`` (and, for a kernel that orders them its own way, ``scales_zeros``) is kept
in the layout of the kernel that runs on its device (the layouts are private to each kernel, see
``moelab.quant.kernels``; ``layout`` names it, None = plain): a state-dict hook turns both back
into the plain form on save, a load pre-hook makes them plain on load, and the first call on a
device packs (or repacks) them.
Floating buffers follow ``model.to(dtype)``; the kernel runs in the scales' dtype (x is cast to
it and the output cast back to x's dtype).

Legend: M rows, K inputs, N outputs, Np/Kp padded (see ``moelab.quant.weights``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.quant import kernels
from moelab.quant.spec import QuantConfig
from moelab.quant.weights import (
    dequantize_int4,
    dequantize_int8,
    pad_weight,
    quantize_int4,
    quantize_int8,
    round_up,
)

INT4_N_MULTIPLE = 16


def pack_nibbles(q_NK: Tensor) -> Tensor:
    """uint8 values 0..15 ``[N, K]`` (K even) → ``[N, K/2]``, column 2j low, 2j+1 high."""
    q = q_NK.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(b_NK2: Tensor) -> Tensor:
    return torch.stack([b_NK2 & 15, b_NK2 >> 4], dim=-1).reshape(b_NK2.shape[0], -1)


class QuantLinear(nn.Module):
    """``y = x · ŵᵀ (+ b)`` with ŵ stored as int8 (per output channel) or int4 (group-wise)."""

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int = 32, bias: bool = False
    ) -> None:
        super().__init__()
        self.spec = QuantConfig(bits=bits, group_size=group_size)
        self.in_features, self.out_features = in_features, out_features
        self.k_padded = round_up(in_features, self.spec.k_multiple)
        self.group_size = group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, self.k_padded, dtype=torch.int8))
            self.register_buffer("scales", torch.zeros(out_features))
        else:
            self.n_padded = round_up(out_features, INT4_N_MULTIPLE)
            self.register_buffer("qweight", torch.zeros(self.n_padded, self.k_padded // 2, dtype=torch.uint8))
            self.register_buffer("scales_zeros", torch.zeros(self.k_padded // group_size, self.n_padded, 2))
        self.layout: str | None = None  # the kernel qweight is packed for (kernels.WeightKernel.name); None = plain
        self.register_state_dict_post_hook(_plain_state_dict_hook)
        self.register_load_state_dict_pre_hook(_plain_load_hook)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @property
    def bits(self) -> int:
        return self.spec.bits

    @classmethod
    @torch.no_grad()
    def from_weight(cls, w_NK: Tensor, bits: int, group_size: int = 32, bias: Tensor | None = None) -> QuantLinear:
        """Quantize an ``[out, in]`` weight; integers are computed in fp32, scales kept in ``w``'s
        dtype (so a bf16 model runs the kernels in bf16)."""
        n, k = w_NK.shape
        mod = cls(k, n, bits, group_size, bias=bias is not None)
        if bits == 8:
            q, s = quantize_int8(pad_weight(w_NK, 1, mod.spec.k_multiple))
            mod.qweight.copy_(q)
            mod.scales.copy_(s)
        else:
            q, sz = quantize_int4(pad_weight(w_NK, INT4_N_MULTIPLE, mod.spec.k_multiple), group_size)
            mod.qweight.copy_(pack_nibbles(q))
            mod.scales_zeros.copy_(sz)
        if bias is not None:
            mod.bias.copy_(bias.float())
        return mod.to(device=w_NK.device, dtype=w_NK.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 32) -> QuantLinear:
        return cls.from_weight(linear.weight.detach(), bits, group_size, linear.bias)

    # ------------------------------------------------------------------ layouts

    @property
    def rows(self) -> int:
        """Rows of the stored weight (int4 pads N to a multiple of 16)."""
        return self.out_features if self.bits == 8 else self.n_padded

    @property
    def plain_shape(self) -> tuple[int, int]:
        """Shape of the stored weight: int8 ``[N, Kp]``, int4 ``[Np, Kp/2]``."""
        return (self.rows, self.k_padded if self.bits == 8 else self.k_padded // 2)

    def plain_qweight(self) -> Tensor:
        """The stored form (int8 ``[N, Kp]``, int4 nibbles ``[Np, Kp/2]``) whatever the in-memory layout."""
        if self.layout is None:
            return self.qweight
        kernel = kernels.kernel_named(self.layout)
        return kernel.unpack(self.qweight, self.group_size, self.rows, self.k_padded)

    def plain_scales(self) -> Tensor:
        """int8 ``scales [N]``, or int4 ``scales_zeros [Kp/group, Np, 2]`` in the stored (PyTorch's) order."""
        if self.bits == 8:
            return self.scales
        return self.scales_zeros if self.layout is None else kernels.kernel_named(self.layout).unpack_scales(self.scales_zeros)

    def kernel_layout(self, plain: Tensor, device: torch.device) -> Tensor:
        """A stored-form weight of this layer's shape → the layout of ``device``'s kernel (for
        offloaded copies, which arrive plain from a checkpoint)."""
        return kernels.kernel_for(self.bits, torch.device(device).type).pack(plain.to(device))

    def kernel_scales(self, plain: Tensor, device: torch.device) -> Tensor:
        """Stored-form scales of this layer's shape → the order of ``device``'s kernel (offloaded copies)."""
        return kernels.kernel_for(self.bits, torch.device(device).type).pack_scales(plain.to(device))

    def pack_for(self, device: torch.device) -> Tensor:
        """The weight in ``device``'s kernel layout, packing (once) if it is not yet; int4 scales follow."""
        kernel = kernels.kernel_for(self.bits, device.type)
        if self.layout != kernel.name:
            plain, plain_scales = self.plain_qweight(), self.plain_scales()
            self.qweight = kernel.pack(plain.to(device))
            if self.bits == 4:
                self.scales_zeros = kernel.pack_scales(plain_scales.to(device))
            self.layout = kernel.name
        return self.qweight

    def dequantized_weight(self) -> Tensor:
        """ŵ ``[N, K]`` in fp32 (the formulas of ``moelab.quant.weights``, padding cut off)."""
        n, k = self.out_features, self.in_features
        if self.bits == 8:
            return dequantize_int8(self.plain_qweight(), self.scales)[:n, :k]
        q_NK = unpack_nibbles(self.plain_qweight())
        return dequantize_int4(q_NK, self.plain_scales(), self.group_size)[:n, :k]

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        """``[..., K] → [..., N]``."""
        kernel = kernels.kernel_for(self.bits, x.device.type)
        packed = self.qweight if self.layout == kernel.name else self.pack_for(x.device)
        return self.apply_with(x, packed, self.scales if self.bits == 8 else self.scales_zeros)

    def payload(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(qweight, scales)`` ready for :meth:`apply_with` on ``device`` (packed for its kernel).
        What expert offloading stores, moves and caches instead of the module."""
        return self.pack_for(torch.device(device)), self.scales if self.bits == 8 else self.scales_zeros

    def apply_with(self, x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
        """This layer's map with the given weight tensors (the module's own, or an offloaded copy
        of them), ``qweight`` in the layout of the kernel of ``x``'s device.

        Each step is skipped when it has nothing to do: at decode a mat-vec takes tens of µs, so
        Python bookkeeping is a real share of the time.
        """
        lead = x.shape[:-1]
        x_MK = x.reshape(-1, self.in_features)
        if x_MK.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        if x_MK.dtype != scales.dtype:
            x_MK = x_MK.to(scales.dtype)
        if self.k_padded != self.in_features:
            x_MK = F.pad(x_MK, (0, self.k_padded - self.in_features))
        if not x_MK.is_contiguous():
            x_MK = x_MK.contiguous()
        kernel = kernels.kernel_for(self.bits, x.device.type)
        y_MN = kernels.matmul(kernel, x_MK, qweight, scales, self.out_features, self.group_size)
        if self.bias is not None:
            y_MN = y_MN + self.bias.to(y_MN.dtype)
        if y_MN.dtype != x.dtype:
            y_MN = y_MN.to(x.dtype)
        return y_MN if len(lead) == 1 else y_MN.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


def _plain_state_dict_hook(module: QuantLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Save the stored form, not a kernel's private layout."""
    if module.layout is None:
        return
    for name, plain in (("qweight", module.plain_qweight), ("scales_zeros", module.plain_scales)):
        if prefix + name in state_dict:
            state_dict[prefix + name] = plain().detach()


def _plain_load_hook(module: QuantLinear, state_dict: dict, prefix: str, *args) -> None:
    """Loaded weights are in the stored form: the module's qweight (and scales, copied in place) become
    plain too, packed again on first use."""
    key = prefix + "qweight"
    if key in state_dict:
        module.qweight = torch.empty(module.plain_shape, dtype=module.qweight.dtype, device=module.qweight.device)
        module.layout = None

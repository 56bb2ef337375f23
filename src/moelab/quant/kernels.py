"""Weight-only matmul kernels, chosen per (bits, device type), each with its own weight layout.

Kernels (torch 2.13; checked by experiment, see docs/quantization.md):
- CPU, where a C compiler is present: moelab's own (:mod:`moelab.native`), which read a 16-row
  interleaved layout at close to the memory bandwidth; same formulas as below; fp32 or bf16.
- int8, CPU (fallback) and CUDA: ``aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])``;
  x and scales share one dtype (fp32, fp16 or bf16). On CPU the bf16 path returns garbage or
  crashes when K is not a multiple of 32, so callers pad K to a multiple of 32.
- int4, CPU (fallback): ``aten._convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15, innerKTiles)``
  → uint8 ``[N, K/2]`` (a blocked layout, not plain nibbles), and
  ``aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group, scales_zeros [K/group, N, 2])``
  computing ``x · ((q − 8) · scale + zero)ᵀ``; needs N % 16 == 0, K % group == 0,
  group in {32, 64, 128, 256}.
- int4, CUDA (untested here: no GPU): ``aten._convert_weight_to_int4pack(uint8 [N, K/2], innerKTiles)``
  (high nibble = even column) and ``aten._weight_int4pack_mm`` (bf16 only, sm80+), same formula.

Every layout is private to its kernel: weights are stored (and saved) plain, and packed for the
kernel of the device they run on (``WeightKernel.pack`` / ``unpack``).

A missing kernel (e.g. int8 on a CUDA build without it, or any other device) raises a
:class:`UserError` naming the op, so a user learns it before a long run, not from a C++ trace.

Legend: M rows of x, K inputs, N outputs; all weights in ``nn.Linear`` layout ``[N, K]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.errors import UserError
from moelab.native import build as native_build
from moelab.native import qmatmul as native
from moelab.registry import Registry

aten = torch.ops.aten


@functools.cache
def _has_kernel(op: str, device_type: str) -> bool:
    """Asked once per (op, device type): the dispatcher query costs more than a small mat-vec's
    bookkeeping, and decode calls the kernels hundreds of times per token."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)


def require_op(op: str, device: torch.device) -> None:
    """Raise UserError unless ``aten::op`` has a kernel for ``device``'s type in this build."""
    if not _has_kernel(op, device.type):
        raise UserError(
            f"this PyTorch build ({torch.__version__}) has no {op} kernel for device {device.type!r}: "
            "run the quantized model on CPU, or keep these weights unquantized (--only experts / no quantize)"
        )


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class WeightKernel:
    """How one layout of quantized weights is made from the stored form and multiplied by.

    ``name`` is what :class:`moelab.quant.linear.QuantLinear` records as its in-memory layout.
    The stored (plain) forms: int8 ``q [N, Kp]``; int4 nibble pairs ``[Np, Kp/2]`` (see
    ``moelab.quant.linear``), with int8 ``scales [N]`` or int4 ``scales_zeros [Kp/group, Np, 2]``;
    a kernel may keep the scales in its own order too (same shape: ``pack_scales`` / ``unpack_scales``).
    ``matmul(x [M, Kp], packed, scales, n, group) → [M, n]``.
    """

    name: str
    bits: int
    pack: Callable[[Tensor], Tensor]  # plain (on the kernel's device) → layout
    unpack: Callable[[Tensor, int, int, int], Tensor]  # (packed, group, n rows, k) → plain
    matmul: Callable[[Tensor, Tensor, Tensor, int, int], Tensor]
    dtypes: tuple[torch.dtype, ...]  # activation dtypes the kernel takes
    ops: tuple[str, ...] = ()  # aten ops it needs (checked when chosen)
    pack_scales: Callable[[Tensor], Tensor] = _identity  # stored scales → this kernel's order (same shape)
    unpack_scales: Callable[[Tensor], Tensor] = _identity


KERNELS: Registry[WeightKernel] = Registry("weight-only kernel")


def _register(kernel: WeightKernel) -> WeightKernel:
    return KERNELS.register(kernel.name)(kernel)


def _nibbles_to_q(plain: Tensor) -> Tensor:
    return torch.stack([plain & 15, plain >> 4], dim=-1).reshape(plain.shape[0], -1)


def _q_to_nibbles(q_NK: Tensor) -> Tensor:
    q = q_NK.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


# --- PyTorch's kernels ------------------------------------------------------------------


def _aten_int8_matmul(x_MK: Tensor, q_NK: Tensor, scales_N: Tensor, n: int, group: int) -> Tensor:
    return aten._weight_int8pack_mm(x_MK, q_NK, scales_N)


def _aten_int4_matmul(x_MK: Tensor, packed: Tensor, scales_zeros: Tensor, n: int, group: int) -> Tensor:
    y = aten._weight_int4pack_mm_for_cpu(x_MK, packed, group, scales_zeros) if x_MK.device.type == "cpu" else (
        aten._weight_int4pack_mm(x_MK, packed, group, scales_zeros)
    )
    return y if y.shape[1] == n else y[:, :n]


def _aten_int4_unpack(packed: Tensor, group: int, n_rows: int, k: int) -> Tensor:
    """Kernel layout → plain nibbles, through the kernel itself.

    Why: the packed layouts are private to each kernel. Multiplying the identity by the packed
    weight with scale 1 and zero 0 returns ``q − 8`` exactly (one nonzero product per output,
    small integers are exact in every float dtype), so no knowledge of the layout is needed.
    """
    dtype = torch.bfloat16 if packed.device.type == "cuda" else torch.float32
    eye_KK = torch.eye(k, dtype=dtype, device=packed.device)
    unit = torch.zeros(k // group, n_rows, 2, dtype=dtype, device=packed.device)
    unit[..., 0] = 1.0
    out_KN = _aten_int4_matmul(eye_KK, packed, unit, n_rows, group)
    return _q_to_nibbles((out_KN.float() + 8.0).round().clamp(0, 15).to(torch.uint8).T.contiguous())


def _pack_cuda(plain: Tensor) -> Tensor:  # untested: no GPU in development
    q = _nibbles_to_q(plain)
    return aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).contiguous(), 2)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_register(WeightKernel("aten-int8", 8, _identity, lambda p, g, n, k: p, _aten_int8_matmul, _FLOATS, ("_weight_int8pack_mm",)))
_register(
    WeightKernel(
        "aten-int4-cpu", 4,
        lambda plain: aten._convert_weight_to_int4pack_for_cpu(_nibbles_to_q(plain).to(torch.int32).contiguous(), 2),
        _aten_int4_unpack, _aten_int4_matmul, _FLOATS,
        ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
    )
)
_register(
    WeightKernel(
        "aten-int4-cuda", 4, _pack_cuda, _aten_int4_unpack, _aten_int4_matmul, (torch.bfloat16,),
        ("_convert_weight_to_int4pack", "_weight_int4pack_mm"),
    )
)


# --- moelab's native CPU kernels (moelab.native) -------------------------------------------


def _native_int8_matmul(x_MK: Tensor, packed: Tensor, scales_N: Tensor, n: int, group: int) -> Tensor:
    return native.q8_matmul(x_MK, packed, scales_N, n)


def _native_int4_matmul(x_MK: Tensor, packed: Tensor, scales_zeros: Tensor, n: int, group: int) -> Tensor:
    return native.q4_matmul(x_MK, packed, group, scales_zeros, n)


_NATIVE = (torch.float32, torch.bfloat16)
_register(
    WeightKernel(
        "native-int8", 8, native.interleave_rows, lambda packed, group, n, k: native.deinterleave_rows(packed, n),
        _native_int8_matmul, _NATIVE,
    )
)
_register(
    WeightKernel(
        "native-int4", 4, native.lane_major_rows, lambda packed, group, n, k: native.from_lane_major(packed, n),
        _native_int4_matmul, _NATIVE, pack_scales=native.block_major_scales, unpack_scales=native.group_major_scales,
    )
)


@functools.cache
def kernel_for(bits: int, device_type: str) -> WeightKernel:
    """The kernel quantized layers use on a device type: moelab's native kernels on CPU where they
    build (see ``moelab.native``), else PyTorch's; a UserError where there is none."""
    if device_type == "cpu":
        from moelab.native.build import library

        name = f"native-int{bits}" if library() is not None else ("aten-int8" if bits == 8 else "aten-int4-cpu")
    elif device_type == "cuda":
        name = "aten-int8" if bits == 8 else "aten-int4-cuda"
    else:
        raise UserError(f"no int{bits} weight-only kernel for device {device_type!r}; supported: cpu, cuda")
    kernel = KERNELS[name]
    for op in kernel.ops:
        require_op(op, torch.device(device_type))
    return kernel


def clear_choices() -> None:
    """Forget the cached kernel choices (after the native library was turned on or off)."""
    kernel_for.cache_clear()


native_build.on_reset(clear_choices)


def kernel_named(name: str) -> WeightKernel:
    return KERNELS[name]


def matmul(kernel: WeightKernel, x_MK: Tensor, packed: Tensor, scales: Tensor, n: int, group: int) -> Tensor:
    """``x · ŵᵀ → [M, n]`` through ``kernel``; a UserError when it does not take x's dtype."""
    if x_MK.dtype not in kernel.dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in kernel.dtypes)
        raise UserError(
            f"the int{kernel.bits} kernel {kernel.name} takes {allowed} activations, not {x_MK.dtype}: "
            "convert the model first, e.g. model.to(torch.bfloat16)"
        )
    return kernel.matmul(x_MK, packed, scales, n, group)

"""PyTorch's weight-only matmul kernels, looked up per (bits, device type).

Kernels used (torch 2.13; checked by experiment, see docs/quantization.md):
- int8, CPU/CUDA: ``aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N]) → [M, N]``;
  x and scales share one dtype (fp32, fp16 or bf16). On CPU the bf16 path returns garbage or
  crashes when K is not a multiple of 32, so callers pad K to a multiple of 32.
- int4, CPU: ``aten._convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15, innerKTiles)``
  → uint8 ``[N, K/2]`` (a blocked layout, not plain nibbles), and
  ``aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group, scales_zeros [K/group, N, 2])``
  computing ``x · ((q − 8) · scale + zero)ᵀ``; needs N % 16 == 0, K % group == 0,
  group in {32, 64, 128, 256}.
- int4, CUDA (untested here: no GPU): ``aten._convert_weight_to_int4pack(uint8 [N, K/2], innerKTiles)``
  (high nibble = even column) and ``aten._weight_int4pack_mm`` (bf16 only, sm80+), same formula.

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


@dataclass(frozen=True)
class Int4Kernel:
    """How one device type packs int4 weights and multiplies by them."""

    pack: Callable[[Tensor], Tensor]  # plain q uint8 [N, K] (0..15) → kernel layout
    matmul: Callable[[Tensor, Tensor, int, Tensor], Tensor]  # (x, packed, group, scales_zeros) → [M, N]
    dtypes: tuple[torch.dtype, ...]  # activation dtypes the kernel takes
    ops: tuple[str, ...]


INT4_KERNELS: Registry[Int4Kernel] = Registry("int4 kernel")


def _pack_cpu(q_NK: Tensor) -> Tensor:
    return aten._convert_weight_to_int4pack_for_cpu(q_NK.to(torch.int32).contiguous(), 2)


def _pack_cuda(q_NK: Tensor) -> Tensor:  # untested: no GPU in development
    q = q_NK.to(torch.uint8)
    return aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).contiguous(), 2)


INT4_KERNELS.register("cpu")(
    Int4Kernel(
        _pack_cpu,
        aten._weight_int4pack_mm_for_cpu,
        (torch.float32, torch.float16, torch.bfloat16),
        ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
    )
)
INT4_KERNELS.register("cuda")(
    Int4Kernel(_pack_cuda, aten._weight_int4pack_mm, (torch.bfloat16,), ("_convert_weight_to_int4pack", "_weight_int4pack_mm"))
)


def int4_kernel(device: torch.device) -> Int4Kernel:
    return _int4_kernel(device.type)


@functools.cache
def _int4_kernel(device_type: str) -> Int4Kernel:
    if device_type not in INT4_KERNELS:
        raise UserError(f"no int4 weight-only kernel for device {device_type!r}; supported: {', '.join(INT4_KERNELS)}")
    kernel = INT4_KERNELS[device_type]
    for op in kernel.ops:
        require_op(op, torch.device(device_type))
    return kernel


def int8_matmul(x_MK: Tensor, q_NK: Tensor, scales_N: Tensor) -> Tensor:
    """``x · (q · scale)ᵀ`` with PyTorch's int8 weight-only kernel; x and scales share a dtype."""
    require_op("_weight_int8pack_mm", x_MK.device)
    return aten._weight_int8pack_mm(x_MK, q_NK, scales_N)


def int4_matmul(x_MK: Tensor, packed: Tensor, group_size: int, scales_zeros_GN2: Tensor) -> Tensor:
    """``x · ((q − 8) · scale + zero)ᵀ`` with the int4 kernel of ``x``'s device."""
    kernel = int4_kernel(x_MK.device)
    if x_MK.dtype not in kernel.dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in kernel.dtypes)
        raise UserError(
            f"the int4 kernel on {x_MK.device.type} takes {allowed} activations, not {x_MK.dtype}: "
            "convert the model first, e.g. model.to(torch.bfloat16)"
        )
    return kernel.matmul(x_MK, packed, group_size, scales_zeros_GN2)


def pack_int4(q_NK: Tensor, device: torch.device) -> Tensor:
    """Plain int4 values ``[N, K]`` (0..15, any integer dtype) → the layout ``device``'s kernel reads."""
    return int4_kernel(device).pack(q_NK.to(device))


def unpack_int4(packed: Tensor, group_size: int, n: int, k: int) -> Tensor:
    """Kernel layout → plain uint8 ``[N, K]`` values 0..15, for any device's layout.

    Why through the kernel: the packed layouts are private to each kernel. Multiplying the
    identity by the packed weight with scale 1 and zero 0 returns ``q − 8`` exactly (one nonzero
    product per output, small integers are exact in every float dtype), so the unpacking needs
    no knowledge of the layout and is checked by the round-trip tests.
    """
    kernel = int4_kernel(packed.device)
    dtype = kernel.dtypes[0]
    eye_KK = torch.eye(k, dtype=dtype, device=packed.device)
    unit = torch.zeros(k // group_size, n, 2, dtype=dtype, device=packed.device)
    unit[..., 0] = 1.0
    out_KN = kernel.matmul(eye_KK, packed, group_size, unit)
    return (out_KN.float() + 8.0).round().clamp(0, 15).to(torch.uint8).T.contiguous()

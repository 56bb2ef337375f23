"""Python side of the native weight-only matmuls: the 16-row layout and the calls.

The layouts (see ``qmatmul.c``): the rows of a plain ``[N, C]`` weight (C = K int8 values,
K/2 bytes of int4 nibble pairs, K/2 bf16 pairs, K fp32 values) are padded to a multiple of 16 and
interleaved 16 at a time, ``[N/16, C, 16]`` (int4: four bytes at a time, ``[N/16, C/4, 16, 4]``),
so that a mat-vec reads one contiguous stream. Stored flat as ``[Np, C]`` (the plain shape when
N is a multiple of 16) so that buffers keep their rank.

Legend: M rows of x, K inputs, N outputs, Np = N rounded up to 16, C bytes per plain row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.native.build import library

BLOCK = 16
"""Output rows per interleaved block. Every row count runs in the native kernels: one row and two to eight
rows share each read of a block (decode); more rows go eight at a time through bf16 dot products with the
block in L1 (prefill; int8 and int4 blocks converted to bf16 pairs once, exactly). Measured on this box, a
3072×768 int8 matrix with bf16 rows, 2 threads: 1.71 ms at 128 rows and 6.64 at 512, where dequantizing to
bf16 and running PyTorch's GEMM (the route before) took 2.68 and 7.11, and the same matrix in bf16 1.76 and
6.54."""


def interleave_rows(plain_NC: Tensor) -> Tensor:
    """Plain ``[N, C]`` → the 16-row interleaved layout, flat ``[Np, C]`` (zero rows appended)."""
    n, c = plain_NC.shape
    n_padded = -(-n // BLOCK) * BLOCK
    if n_padded != n:
        plain_NC = torch.cat([plain_NC, plain_NC.new_zeros(n_padded - n, c)])
    return plain_NC.reshape(n_padded // BLOCK, BLOCK, c).transpose(1, 2).contiguous().reshape(n_padded, c)


def deinterleave_rows(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`interleave_rows`: the first ``n`` plain rows ``[n, C]``."""
    n_padded, c = packed.shape
    return packed.reshape(n_padded // BLOCK, c, BLOCK).transpose(1, 2).reshape(n_padded, c)[:n].contiguous()


def lane_major_rows(plain_NC: Tensor) -> Tensor:
    """int4 nibble pairs ``[N, C]`` (C = K/2, a multiple of 4) → the lane-major layout: 16 rows
    interleaved four bytes (eight inputs) at a time, ``[N/16, C/4, 16, 4]``, flat ``[Np, C]``.
    One 32-bit lane then holds eight inputs of one row, as the integer dot products read them."""
    n, c = plain_NC.shape
    if c % 4:
        raise ValueError(f"lane-major int4 needs K % 8 == 0, got {2 * c} inputs")
    n_padded = -(-n // BLOCK) * BLOCK
    if n_padded != n:
        plain_NC = torch.cat([plain_NC, plain_NC.new_zeros(n_padded - n, c)])
    blocks = plain_NC.reshape(n_padded // BLOCK, BLOCK, c // 4, 4).permute(0, 2, 1, 3)
    return blocks.contiguous().reshape(n_padded, c)


def from_lane_major(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`lane_major_rows`: the first ``n`` plain rows."""
    n_padded, c = packed.shape
    blocks = packed.reshape(n_padded // BLOCK, c // 4, BLOCK, 4).permute(0, 2, 1, 3)
    return blocks.reshape(n_padded, c)[:n].contiguous()


def block_major_scales(scales_zeros_GN2: Tensor) -> Tensor:
    """int4 ``(scale, zero)`` pairs from PyTorch's group-major ``[K/group, Np, 2]`` to the native
    kernels' block-major order ``[Np/16, K/group, 16, 2]``, kept in the shape ``[K/group, Np, 2]``
    (so buffers keep their shape and ``.to(dtype)`` keeps the order): a 16-row block's pairs lie in
    one run, read beside its weights instead of from K/group strided places."""
    g, n_padded, two = scales_zeros_GN2.shape
    blocks = scales_zeros_GN2.reshape(g, n_padded // BLOCK, BLOCK, two).permute(1, 0, 2, 3)
    return blocks.contiguous().reshape(g, n_padded, two)


def group_major_scales(block_major: Tensor) -> Tensor:
    """Inverse of :func:`block_major_scales`."""
    g, n_padded, two = block_major.shape
    blocks = block_major.reshape(n_padded // BLOCK, g, BLOCK, two).permute(1, 0, 2, 3)
    return blocks.contiguous().reshape(g, n_padded, two)


def _check(x_MK: Tensor, scales: Tensor, k: int) -> int:
    """The C code trusts its arguments: shapes, dtypes and contiguity are checked here."""
    if x_MK.device.type != "cpu" or x_MK.dtype not in (torch.bfloat16, torch.float32) or x_MK.dtype != scales.dtype:
        raise ValueError(f"native kernels take CPU bf16/fp32 x with scales of the same dtype, got {x_MK.dtype}/{scales.dtype}")
    if x_MK.dim() != 2 or x_MK.shape[1] != k or k % 4 or not (x_MK.is_contiguous() and scales.is_contiguous()):
        raise ValueError(f"native kernels take contiguous x [M, {k}] (K a multiple of 4), got {tuple(x_MK.shape)}")
    return int(x_MK.dtype == torch.bfloat16)


def q8_matmul(x_MK: Tensor, packed: Tensor, scales_N: Tensor, n: int) -> Tensor:
    """``x · (q · scale)ᵀ → [M, n]`` with ``packed`` from :func:`interleave_rows` of int8 ``q [n, K]``."""
    bf16 = _check(x_MK, scales_N, packed.shape[1])
    if scales_N.numel() < n or packed.shape[0] < n:
        raise ValueError(f"int8 weight {tuple(packed.shape)} / scales {tuple(scales_N.shape)} hold fewer than {n} rows")
    return torch.ops.moelab.q8_matmul.default(x_MK, packed, scales_N, n, bf16)


def _q8_kernel(x_MK: Tensor, packed: Tensor, scales_N: Tensor, n: int, bf16: int) -> Tensor:
    m, k = x_MK.shape
    y = x_MK.new_empty(m, n)
    if m == 0:
        return y
    rc = library().moelab_q8_matmul(  # type: ignore[union-attr]
        x_MK.data_ptr(), packed.data_ptr(), scales_N.data_ptr(), y.data_ptr(), m, n, k, bf16, torch.get_num_threads()
    )
    if rc != 0:
        raise MemoryError("native int8 matmul could not allocate its scratch buffers")
    return y


def q4_matmul(x_MK: Tensor, packed: Tensor, group_size: int, scales_zeros_GN2: Tensor, n: int) -> Tensor:
    """``x · ((q − 8) · scale + zero)ᵀ → [M, n]``; ``packed`` is :func:`lane_major_rows` of the
    plain nibble pairs ``[Np, K/2]``, ``scales_zeros`` ``[K/group, Np, 2]`` in :func:`block_major_scales` order."""
    bf16 = _check(x_MK, scales_zeros_GN2, 2 * packed.shape[1])
    k = x_MK.shape[1]
    if k % group_size or scales_zeros_GN2.shape != (k // group_size, packed.shape[0], 2) or packed.shape[0] < n:
        raise ValueError(f"int4 weight {tuple(packed.shape)} / scales {tuple(scales_zeros_GN2.shape)} do not fit K={k}, group {group_size}")
    return torch.ops.moelab.q4_matmul.default(x_MK, packed, group_size, scales_zeros_GN2, n, bf16)


def _q4_kernel(x_MK: Tensor, packed: Tensor, group_size: int, scales_zeros_GN2: Tensor, n: int, bf16: int) -> Tensor:
    m, k = x_MK.shape
    y = x_MK.new_empty(m, n)
    if m == 0:
        return y
    rc = library().moelab_q4_matmul(  # type: ignore[union-attr]
        x_MK.data_ptr(), packed.data_ptr(), group_size, scales_zeros_GN2.data_ptr(), y.data_ptr(),
        m, n, packed.shape[0], k, bf16, torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("native int4 matmul could not allocate its scratch buffers")
    return y


def bf16_pack(w_NK: Tensor) -> Tensor:
    """A bf16 weight ``[N, K]`` (K % 8 == 0) → the pair layout: 16 rows interleaved, two inputs per
    32-bit lane, flat ``[Np, K/2]`` int32."""
    k = w_NK.shape[1]
    if w_NK.dtype != torch.bfloat16 or k % 8:
        raise ValueError(f"bf16_pack takes a bf16 [N, K] weight with K % 8 == 0, got {w_NK.dtype} {tuple(w_NK.shape)}")
    return interleave_rows(w_NK.detach().contiguous().view(torch.int32))


def bf16_matmul(x_MK: Tensor, packed: Tensor, n: int) -> Tensor:
    """``x · wᵀ → [M, n]`` in bf16 (fp32 sums, one rounding) with ``packed`` from :func:`bf16_pack`."""
    return _float_matmul(x_MK, packed, n, torch.bfloat16, 2 * packed.shape[1], "bf16", "bf16")


def f32_pack(w_NK: Tensor) -> Tensor:
    """An fp32 weight ``[N, K]`` (K % 4 == 0) → the 16-row layout, flat ``[Np, K]``."""
    if w_NK.dtype != torch.float32 or w_NK.shape[1] % 4:
        raise ValueError(f"f32_pack takes an fp32 [N, K] weight with K % 4 == 0, got {w_NK.dtype} {tuple(w_NK.shape)}")
    return interleave_rows(w_NK.detach().contiguous())


def f32_matmul(x_MK: Tensor, packed: Tensor, n: int) -> Tensor:
    """``x · wᵀ → [M, n]`` in fp32 with ``packed`` from :func:`f32_pack`."""
    return _float_matmul(x_MK, packed, n, torch.float32, packed.shape[1], "fp32", "f32")


def _float_matmul(
    x_MK: Tensor, packed: Tensor, n: int, dtype: torch.dtype, k: int, name: str, op: str
) -> Tensor:
    """The bf16 and fp32 kernels share their checks and calling convention: ``(x, w, y, M, N, K, threads)``."""
    if x_MK.dtype != dtype or x_MK.device.type != "cpu":
        raise ValueError(f"the native {name} kernel takes CPU {name} x, got {x_MK.dtype} on {x_MK.device}")
    if x_MK.dim() != 2 or x_MK.shape[1] != k or not x_MK.is_contiguous() or packed.shape[0] < n:
        raise ValueError(f"the native {name} kernel takes contiguous x [M, {k}], got {tuple(x_MK.shape)}")
    return getattr(torch.ops.moelab, f"{op}_matmul").default(x_MK, packed, n)


def _float_kernel(entry: str, name: str):
    def kernel(x_MK: Tensor, packed: Tensor, n: int) -> Tensor:
        m, k = x_MK.shape
        y = x_MK.new_empty(m, n)
        if m == 0:
            return y
        rc = getattr(library(), entry)(x_MK.data_ptr(), packed.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"native {name} matmul could not allocate its scratch buffers")
        return y

    return kernel


# The kernels as torch operators (``torch.ops.moelab.*``): the profiler names them, and torch.compile
# traces through them with their shape functions (the "Meta" implementations) instead of breaking the
# graph at an opaque ctypes call. A ``Library`` with a CPU kernel costs ≈3.5 µs a call on this box
# (``torch.library.custom_op`` ≈13 µs: more than a small decode mat-vec itself), checks stay in Python.
_LIB = torch.library.Library("moelab", "DEF")


def _y(x_MK: Tensor, n: int) -> Tensor:
    """The output's shape and dtype (what torch.compile traces with)."""
    return x_MK.new_empty(x_MK.shape[0], n)


for _name, _schema, _kernel, _shape in (
    ("q8_matmul", "q8_matmul(Tensor x, Tensor packed, Tensor scales, int n, int bf16) -> Tensor", _q8_kernel,
     lambda x, packed, scales, n, bf16: _y(x, n)),
    ("q4_matmul", "q4_matmul(Tensor x, Tensor packed, int group, Tensor scales_zeros, int n, int bf16) -> Tensor",
     _q4_kernel, lambda x, packed, group, scales_zeros, n, bf16: _y(x, n)),
    ("bf16_matmul", "bf16_matmul(Tensor x, Tensor packed, int n) -> Tensor", _float_kernel("moelab_bf16_matmul", "bf16"),
     lambda x, packed, n: _y(x, n)),
    ("f32_matmul", "f32_matmul(Tensor x, Tensor packed, int n) -> Tensor", _float_kernel("moelab_f32_matmul", "fp32"),
     lambda x, packed, n: _y(x, n)),
):  # fmt: skip
    _LIB.define(_schema)
    _LIB.impl(_name, _kernel, "CPU")
    _LIB.impl(_name, _shape, "Meta")

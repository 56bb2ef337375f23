"""Quantizing a weight matrix: integers plus scales (and zeros), and back.

Formulas (w one output channel's row, g one group of its inputs):
- int8, symmetric per output channel: ``s = max|w| / 127``, ``q = round(w / s)`` in [-127, 127],
  ``ŵ = q · s``.
- int4, asymmetric per group: ``s = (max_g w − min_g w) / 15``, ``q = round((w − min_g w) / s)`` in
  [0, 15], and in the kernels' convention ``ŵ = (q − 8) · s + z`` with ``z = min_g w + 8 · s``
  (so ``ŵ = q · s + min_g w``: a group's minimum and maximum are represented exactly).
A constant row or group gets ``s = 0`` and is reproduced exactly.

Padding (documented in docs/quantization.md): the kernels need K (inputs) to be a multiple of
the group size (int4) or of 32 (int8, see ``kernels``), and N a multiple of 16 (int4). Weights
are zero-padded to ``[Np, Kp]`` here, inputs are zero-padded to Kp at call time and outputs
cut back to N, so any shape works; a partial last group is quantized together with its zero
padding (which only widens its range).

Legend: N outputs, K inputs, Np/Kp padded, G groups along K (Kp / group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_weight(w_NK: Tensor, n_multiple: int, k_multiple: int) -> Tensor:
    """Zero-pad ``[N, K]`` to ``[Np, Kp]`` (fp32)."""
    n, k = w_NK.shape
    return F.pad(w_NK.float(), (0, round_up(k, k_multiple) - k, 0, round_up(n, n_multiple) - n))


def quantize_int8(w_NK: Tensor) -> tuple[Tensor, Tensor]:
    """``(q int8 [N, K], scale fp32 [N])``; ``ŵ = q · scale``."""
    w = w_NK.float()
    amax_N = w.abs().amax(dim=1)
    scale_N = amax_N / 127.0
    safe_N = torch.where(scale_N > 0, scale_N, torch.ones_like(scale_N))
    q_NK = torch.round(w / safe_N[:, None]).clamp(-127, 127).to(torch.int8)
    return q_NK, scale_N


def dequantize_int8(q_NK: Tensor, scale_N: Tensor) -> Tensor:
    return q_NK.float() * scale_N.float()[:, None]


def quantize_int4(w_NK: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """``(q uint8 [N, K] in 0..15, scales_zeros fp32 [G, N, 2])`` for K a multiple of ``group_size``.

    ``scales_zeros[g, n] = (scale, zero)`` of output n's g-th input group, the kernels' layout.
    """
    n, k = w_NK.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}: pad the weight first (pad_weight)")
    w_NGg = w_NK.float().reshape(n, k // group_size, group_size)
    lo_NG = w_NGg.amin(dim=-1)
    scale_NG = (w_NGg.amax(dim=-1) - lo_NG) / 15.0
    safe_NG = torch.where(scale_NG > 0, scale_NG, torch.ones_like(scale_NG))
    q_NGg = torch.round((w_NGg - lo_NG[..., None]) / safe_NG[..., None]).clamp(0, 15)
    zero_NG = lo_NG + 8.0 * scale_NG
    scales_zeros_GN2 = torch.stack([scale_NG, zero_NG], dim=-1).transpose(0, 1).contiguous()
    return q_NGg.reshape(n, k).to(torch.uint8), scales_zeros_GN2


def dequantize_int4(q_NK: Tensor, scales_zeros_GN2: Tensor, group_size: int) -> Tensor:
    """``ŵ = (q − 8) · scale + zero`` per group, fp32 ``[N, K]``."""
    sz = scales_zeros_GN2.float()
    scale_NK = sz[..., 0].T.repeat_interleave(group_size, dim=1)
    zero_NK = sz[..., 1].T.repeat_interleave(group_size, dim=1)
    return (q_NK.float() - 8.0) * scale_NK + zero_NK

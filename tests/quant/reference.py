"""Independent dequantization for the quant tests: the formulas written out, not moelab's code."""

from __future__ import annotations

import torch

from moelab.quant import QuantLinear
from moelab.quant.linear import unpack_nibbles


def reference_weight(mod: QuantLinear) -> torch.Tensor:
    """ŵ [N, K] from the saved integers: int8 q·s; int4 (q − 8)·scale + zero per group of K."""
    sd = mod.state_dict()
    n, k = mod.out_features, mod.in_features
    if mod.bits == 8:
        return (sd["qweight"].float() * sd["scales"].float()[:, None])[:n, :k]
    q = unpack_nibbles(sd["qweight"]).float()  # [Np, Kp]
    w = torch.empty_like(q)
    g = mod.group_size
    sz = sd["scales_zeros"].float()  # [Kp/g, Np, 2]
    for j in range(q.shape[1] // g):
        w[:, j * g : (j + 1) * g] = (q[:, j * g : (j + 1) * g] - 8) * sz[j, :, 0:1] + sz[j, :, 1:2]
    return w[:n, :k]

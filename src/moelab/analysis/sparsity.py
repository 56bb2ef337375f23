"""Dense FFN activation sparsity: how much of a dense FFN does one token use?

The seed claim (seeds/000, and the MoE literature's motivation): for a given token only a small
part of a dense FFN's hidden neurons (often quoted as 20–50%) are meaningfully active, so a
dense FFN is already "sparse in use" and an MoE makes that sparsity structural.

The hidden activation of a DenseMLP is ``h = act(W_up x)`` (SwiGLU: ``silu(gate)·up``), the
input of ``w_down``. A neuron i is *active* for a token when ``|h_i| > τ · max_j |h_j|`` (τ
relative to the token's largest activation, so the answer does not depend on the scale of the
weights; SwiGLU and GELU are never exactly zero, so an absolute zero test would say 100%).
Reported per dense layer: the mean active fraction over tokens at each τ in ``thresholds``, and
the distribution over tokens at the main τ.

Legend: N tokens, F hidden neurons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moelab.data.loader import Batch
from moelab.nn.ffn import DenseMLP

THRESHOLDS = (0.01, 0.05, 0.1, 0.2, 0.5)


def active_fraction(h_NF: Tensor, tau: float) -> Tensor:
    """``[N]`` share of the F neurons with ``|h| > tau · max |h|`` for each token."""
    a = h_NF.abs().float()
    peak = a.max(dim=-1, keepdim=True).values
    return (a > tau * peak).float().mean(dim=-1)


def dense_ffns(model: torch.nn.Module) -> dict[int, DenseMLP]:
    """``{layer: DenseMLP}`` for the dense FFN blocks (shared experts are not blocks' FFNs)."""
    return {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, DenseMLP)}


@torch.no_grad()
def ffn_sparsity(
    model: torch.nn.Module, batches: Sequence[Batch], thresholds: Sequence[float] = THRESHOLDS, main: float = 0.1
) -> dict[str, Any]:
    """Active-neuron fractions of every dense FFN layer over ``batches`` (module doc)."""
    ffns = dense_ffns(model)
    taus = sorted(set(thresholds) | {main})
    sums = {i: np.zeros(len(taus)) for i in ffns}
    hist = {i: np.zeros(20) for i in ffns}
    counts = dict.fromkeys(ffns, 0)
    handles = []

    def hook_for(layer: int):
        def hook(_mod: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            h_NF = args[0].reshape(-1, args[0].shape[-1])
            for j, tau in enumerate(taus):
                frac_N = active_fraction(h_NF, tau)
                sums[layer][j] += float(frac_N.sum())
                if tau == main:
                    hist[layer] += np.histogram(frac_N.cpu().numpy(), bins=20, range=(0.0, 1.0))[0]
            counts[layer] += h_NF.shape[0]

        return hook

    for i, mlp in ffns.items():
        handles.append(mlp.w_down.register_forward_pre_hook(hook_for(i)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(batch.input_ids.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    layers = {}
    for i in ffns:
        n = max(1, counts[i])
        layers[str(i)] = {
            "hidden": ffns[i].hidden,
            "tokens": counts[i],
            "active_fraction": {f"{tau:g}": float(sums[i][j] / n) for j, tau in enumerate(taus)},
            "histogram": (hist[i] / n).tolist(),
        }
    return {"main_threshold": main, "thresholds": taus, "layers": layers}

"""Gradient conflict between domains in the feed-forward weights, dense FFN vs MoE experts.

The seed claim (seeds/000): in a dense model every token's gradient lands on the same FFN
weights, so gradients from different domains pull them in different directions ("conflicting
gradients"); experts receive only their own tokens' gradients, so domains that route apart
stop interfering. Measured here on the same batches for any model:

    g_d = ∂ L_d / ∂ W_ffn        L_d = LM loss summed over the tokens labelled domain d
    conflict(d, d') = cos(g_d, g_d')

per layer, over the whole FFN (dense: ``w_up`` and ``w_down``; MoE: all experts' stacked
weights as one vector) and, for MoE, per expert (mean over experts both domains reach). A
cosine near 1 means the domains agree on the update, near 0 that they touch different weights
(or orthogonal directions), below 0 that they fight. Experts that separate domains drive the
whole-layer cosine towards 0 because the gradients have disjoint support.

Router losses are left out: the question is about the language-modelling signal.

Legend: B batch, S sequence, V vocab, E experts, P parameters of one expert (flattened).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.config import IGNORE_INDEX
from moelab.data.loader import Batch
from moelab.moe.layer import MoELayer
from moelab.nn.ffn import DenseMLP


def ffn_weights(model: torch.nn.Module) -> dict[int, tuple[bool, list[Tensor]]]:
    """``{layer: (is_moe, [weights])}``: each block's FFN weights (MoE: expert stacks ``[E, …]``)."""
    out: dict[int, tuple[bool, list[Tensor]]] = {}
    for i, block in enumerate(model.blocks):
        ffn = block.ffn
        if isinstance(ffn, MoELayer):
            out[i] = (True, [ffn.experts.w_up, ffn.experts.w_down])
        elif isinstance(ffn, DenseMLP):
            out[i] = (False, [ffn.w_up.weight, ffn.w_down.weight])
    return out


def memory_needed(model: torch.nn.Module, n_values: int) -> int:
    """Bytes :func:`domain_gradients` holds at its peak: one summed gradient of the FFN weights per label
    value, plus the step's own gradient and its flattened copy (activations are small beside them)."""
    ffn_bytes = sum(w.numel() * w.element_size() for _, ws in ffn_weights(model).values() for w in ws)
    return (n_values + 2) * ffn_bytes


def domain_gradients(
    model: torch.nn.Module, batches: Sequence[Batch], label: str = "domain"
) -> tuple[list[int], dict[int, dict[int, Tensor]]]:
    """Per label value d: ``{layer: gradient}`` summed over batches (MoE: ``[E, P]``, dense: ``[P]``).

    One forward per batch, then one backward per label value present (``retain_graph``), so
    every value's gradient comes from exactly the same forward pass.
    """
    weights = ffn_weights(model)
    params = [w for _, ws in weights.values() for w in ws]
    device = params[0].device
    grads: dict[int, dict[int, Tensor]] = {}
    was_training = model.training
    model.eval()  # no dropout: the same function for every domain
    try:
        for batch in batches:
            out = model(batch.input_ids.to(device))
            logits = out.logits.float().reshape(-1, out.logits.shape[-1])
            labels_N = batch.labels.to(device).reshape(-1)
            dom_N = batch.label_ids[label].to(device).reshape(-1)
            values = [int(v) for v in torch.unique(dom_N[labels_N != IGNORE_INDEX]).tolist()]
            for k, d in enumerate(values):
                target = torch.where(dom_N == d, labels_N, torch.full_like(labels_N, IGNORE_INDEX))
                loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
                gs = torch.autograd.grad(loss, params, retain_graph=k < len(values) - 1, allow_unused=True)
                it = iter(gs)
                acc = grads.setdefault(d, {})
                for layer, (is_moe, ws) in weights.items():
                    parts = [torch.zeros_like(w) if g is None else g for w, g in zip(ws, [next(it) for _ in ws])]
                    flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1) if is_moe else torch.cat([p.reshape(-1) for p in parts])
                    acc[layer] = acc[layer] + flat.detach() if layer in acc else flat.detach()
    finally:
        model.train(was_training)
    return sorted(grads), grads


def cosine_matrix(vectors: list[Tensor]) -> np.ndarray:
    """``[D, D]`` cosine similarity of flattened vectors (0 where either is zero)."""
    m = torch.stack([v.reshape(-1).double() for v in vectors])
    norms = m.norm(dim=1)
    dots = m @ m.T
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(dots)).numpy()


def _offdiag_mean(m: np.ndarray) -> float:
    n = m.shape[0]
    return float(m[~np.eye(n, dtype=bool)].mean()) if n > 1 else 1.0


def gradient_conflict(
    model: torch.nn.Module, batches: Sequence[Batch], label: str = "domain", names: list[str] | None = None
) -> dict[str, Any]:
    """Domain-gradient cosines per FFN layer (module doc); JSON-able."""
    values, grads = domain_gradients(model, batches, label)
    weights = ffn_weights(model)
    layers = {}
    for layer, (is_moe, _) in weights.items():
        vecs = [grads[d][layer] for d in values]
        whole = cosine_matrix(vecs)
        entry: dict[str, Any] = {"moe": is_moe, "matrix": whole.tolist(), "mean_offdiag": _offdiag_mean(whole)}
        if is_moe and len(values) > 1:
            per_expert = []
            for e in range(vecs[0].shape[0]):
                m = cosine_matrix([v[e] for v in vecs])
                reached = torch.stack([v[e].norm() > 0 for v in vecs]).numpy()
                pair = reached[:, None] & reached[None, :] & ~np.eye(len(values), dtype=bool)
                if pair.any():
                    per_expert.append(float(m[pair].mean()))
            entry["per_expert_mean_offdiag"] = float(np.mean(per_expert)) if per_expert else 0.0
        layers[str(layer)] = entry
    return {
        "label": label,
        "values": [names[d] if names and d < len(names) else str(d) for d in values],
        "layers": layers,
    }

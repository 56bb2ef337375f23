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

A noise ceiling (``ceiling=True``): a gradient summed over fewer tokens is noisier, and noise alone
pulls a cosine towards 0 — an expert sees a fraction of a domain's tokens, so its raw cosines are
biased low against the dense FFN's. Each domain's gradient is also summed over two halves of the
blocks (even / odd rows of every batch), and the split-half cosine ``r_d = cos(g_d^A, g_d^B)`` measures how far noise
alone decorrelates that domain from itself; the Spearman–Brown step ``ρ_d = 2 r_d / (1 + r_d)`` gives
the reliability of the whole-data gradient, and the normalised cosine
``cos(g_d, g_d') / sqrt(ρ_d ρ_d')`` estimates the cosine of the noise-free gradients (the correction
for attenuation of a correlation). Pairs where a reliability is not positive are left out.

Legend: B batch, S sequence, V vocab, E experts, P parameters of one expert (flattened).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    model: torch.nn.Module, batches: Sequence[Batch], label: str = "domain", halves: bool = False
) -> tuple[list[int], dict[int, dict[int, Tensor]]]:
    """Per label value d: ``{layer: gradient}`` summed over batches (MoE: ``[E, P]``, dense: ``[P]``);
    with ``halves``, ``[2, E, P]`` / ``[2, P]``: the sums over the blocks in even and in odd rows of the
    batches (their sum is the whole gradient; a block is one stretch of one document's text).

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
            B, S = batch.labels.shape
            half_N = (torch.arange(B, device=device) % 2).repeat_interleave(S)  # the block's row parity
            values = [int(v) for v in torch.unique(dom_N[labels_N != IGNORE_INDEX]).tolist()]
            jobs = [(d, h) for d in values for h in ((0, 1) if halves else (None,))]
            for k, (d, h) in enumerate(jobs):
                mine = dom_N == d if h is None else (dom_N == d) & (half_N == h)
                target = torch.where(mine, labels_N, torch.full_like(labels_N, IGNORE_INDEX))
                if not (target != IGNORE_INDEX).any():
                    continue
                loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
                gs = torch.autograd.grad(loss, params, retain_graph=k < len(jobs) - 1, allow_unused=True)
                it = iter(gs)
                acc = grads.setdefault(d, {})
                for layer, (is_moe, ws) in weights.items():
                    parts = [torch.zeros_like(w) if g is None else g for w, g in zip(ws, [next(it) for _ in ws])]
                    flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1) if is_moe else torch.cat([p.reshape(-1) for p in parts])
                    if h is not None:
                        if layer not in acc:
                            acc[layer] = flat.new_zeros((2, *flat.shape))
                        acc[layer][h] += flat.detach()
                    else:
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


def split_half_reliability(half_a: Tensor, half_b: Tensor) -> float:
    """``ρ = 2r / (1 + r)`` with ``r = cos(half_a, half_b)`` (Spearman–Brown): how reliable the sum of the
    two halves is as an estimate of its noise-free direction; NaN when either half is zero or ``r ≤ −1``."""
    r = float(cosine_matrix([half_a, half_b])[0, 1])
    if half_a.norm() == 0 or half_b.norm() == 0 or r <= -1.0:
        return float("nan")
    return 2.0 * r / (1.0 + r)


def pair_ceilings(reliability: np.ndarray) -> np.ndarray:
    """``[D, D]`` noise ceilings ``sqrt(ρ_d ρ_d')``; NaN where a reliability is missing or not positive."""
    rel = np.where(np.isfinite(reliability) & (reliability > 0), reliability, np.nan)
    return np.sqrt(rel[:, None] * rel[None, :])


def normalised_cosines(cos: np.ndarray, reliability: np.ndarray) -> np.ndarray:
    """``cos[d, d'] / sqrt(ρ_d ρ_d')``: cosines corrected for the attenuation noise causes; NaN where a
    reliability is missing or not positive."""
    return cos / pair_ceilings(reliability)


@dataclass
class CeilingSums:
    """Off-diagonal pairs that have a noise ceiling, summed: ``Σ cos`` and ``Σ sqrt(ρ_d ρ_d')`` over them.

    Their ratio is the normalised cosine. A ratio of sums rather than a mean of per-pair ratios: an
    expert that saw few of a domain's tokens has a reliability near 0, and dividing by it would let that
    expert's noise dominate; summed, each pair weighs by its reliability (each expected cosine is
    ``cos_true · sqrt(ρ_d ρ_d')``, so the ratio estimates ``cos_true``)."""

    cos: float = 0.0
    ceiling: float = 0.0
    pairs: int = 0
    pairs_without: int = 0  # off-diagonal pairs left out: a reliability missing or not positive

    def add(self, cos: np.ndarray, reliability: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Add the pairs of one ``[D, D]`` cosine matrix (``keep``: which pairs count at all)."""
        off = ~np.eye(cos.shape[0], dtype=bool) if keep is None else keep & ~np.eye(cos.shape[0], dtype=bool)
        ceiling = pair_ceilings(reliability)
        ok = off & np.isfinite(ceiling)
        self.cos += float(cos[ok].sum())
        self.ceiling += float(ceiling[ok].sum())
        self.pairs += int(ok.sum())
        self.pairs_without += int((off & ~ok).sum())

    def to_json(self, prefix: str) -> dict[str, float]:
        """``{prefix}normalised_mean_offdiag`` (NaN without pairs), the raw mean over the same pairs,
        the mean ceiling and the share of pairs left out."""
        n, total = self.pairs, self.pairs + self.pairs_without
        return {
            f"{prefix}normalised_mean_offdiag": self.cos / self.ceiling if n and self.ceiling > 0 else float("nan"),
            f"{prefix}ceiling_pairs_mean_offdiag": self.cos / n if n else float("nan"),
            f"{prefix}mean_ceiling": self.ceiling / n if n else float("nan"),
            f"{prefix}pairs_without_ceiling": self.pairs_without / total if total else 0.0,
        }


def gradient_conflict(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    label: str = "domain",
    names: list[str] | None = None,
    ceiling: bool = False,
) -> dict[str, Any]:
    """Domain-gradient cosines per FFN layer (module doc); JSON-able. ``ceiling``: also each domain's
    split-half reliability and the normalised cosines (:class:`CeilingSums`: ``normalised_mean_offdiag``,
    for MoE also ``per_expert_normalised_mean_offdiag`` over every expert's pairs), from gradients summed
    over the blocks in even and in odd batch rows."""
    values, grads = domain_gradients(model, batches, label, halves=ceiling)
    weights = ffn_weights(model)
    layers = {}
    for layer, (is_moe, _) in weights.items():
        parts = [grads[d][layer] for d in values]
        vecs = [p.sum(0) for p in parts] if ceiling else parts
        whole = cosine_matrix(vecs)
        entry: dict[str, Any] = {"moe": is_moe, "matrix": whole.tolist(), "mean_offdiag": _offdiag_mean(whole)}
        if ceiling:
            rel = np.array([split_half_reliability(p[0], p[1]) for p in parts])
            sums = CeilingSums()
            sums.add(whole, rel)
            entry |= {"reliability": rel.tolist(), **sums.to_json("")}
        if is_moe and len(values) > 1:
            per_expert = []
            expert_sums = CeilingSums()
            for e in range(vecs[0].shape[0]):
                m = cosine_matrix([v[e] for v in vecs])
                reached = torch.stack([v[e].norm() > 0 for v in vecs]).numpy()
                pair = reached[:, None] & reached[None, :] & ~np.eye(len(values), dtype=bool)
                if pair.any():
                    per_expert.append(float(m[pair].mean()))
                if ceiling:
                    expert_sums.add(m, np.array([split_half_reliability(p[0][e], p[1][e]) for p in parts]), pair)
            entry["per_expert_mean_offdiag"] = float(np.mean(per_expert)) if per_expert else 0.0
            if ceiling:
                entry |= expert_sums.to_json("per_expert_")
        layers[str(layer)] = entry
    return {
        "label": label,
        "values": [names[d] if names and d < len(names) else str(d) for d in values],
        "layers": layers,
    }

"""Load metrics of a routing trace: per layer and expert, co-activation and layer transitions.

Why these: a router can fail quietly (a few experts take everything, some never fire, capacity
drops pile up). Each number answers one such question on the whole pass, not one batch:

- ``load_fraction[e]``: share of the router's assignments (before drops) that went to expert e.
- ``cv``: coefficient of variation of the loads (std / mean; 0 = perfectly balanced).
- ``max_over_mean``: the busiest expert's load over the mean load (1 = balanced, E = collapse).
- ``entropy``: entropy of ``load_fraction`` divided by log E (1 = balanced, 0 = one expert).
- ``dead_experts``: experts that received no assignment in the whole pass.
- ``drop_rate`` (overall and per expert): dropped / routed assignments.
- ``mean_weight[e]``: mean combine weight of e's assignments; ``top1_margin``: mean gap between
  a token's best and second-best router score (how decisive the router is).
- ``coactivation[e, f]``: tokens that chose both e and f (e ≠ f, diagonal 0); symmetric, and for
  top-k routing row e sums to (k−1)·load[e].
- ``transition[e, f]``: share of tokens whose top-1 expert is e in one MoE layer and f in the next.

Only valid (non-padding) tokens count. Legend: N tokens, A assignments, E experts.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from moelab.analysis.trace import Trace


def _valid_assignments(trace: Trace, layer: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    la = trace.layer(layer)
    valid_N = trace.array("valid").astype(bool)
    return la, valid_N[la["a_token"]]


def load_counts(expert_A: np.ndarray, num_experts: int) -> np.ndarray:
    """``[E]`` assignments per expert."""
    return np.bincount(expert_A.astype(np.int64), minlength=num_experts)


def balance_stats(load_E: np.ndarray) -> dict[str, float]:
    """CV, max/mean and normalised entropy of a load vector ``[E]``."""
    E = len(load_E)
    total = load_E.sum()
    if total == 0:
        return {"cv": 0.0, "max_over_mean": 0.0, "entropy": 0.0}
    frac = load_E / total
    mean = load_E.mean()
    nz = frac[frac > 0]
    entropy = float(-(nz * np.log(nz)).sum() / np.log(E)) if E > 1 else 1.0
    return {"cv": float(load_E.std() / mean), "max_over_mean": float(load_E.max() / mean), "entropy": entropy}


def coactivation(token_A: np.ndarray, expert_A: np.ndarray, num_experts: int) -> np.ndarray:
    """``[E, E]`` count of tokens that chose both e and f (each unordered pair once per token, both cells).

    Built from the one-hot token×expert incidence M (``[N, E]``): ``Mᵀ M`` minus its diagonal.
    """
    if token_A.size == 0:
        return np.zeros((num_experts, num_experts), dtype=np.int64)
    _, tok = np.unique(token_A, return_inverse=True)
    M = np.zeros((tok.max() + 1, num_experts), dtype=np.float64)
    M[tok, expert_A.astype(np.int64)] = 1.0  # a token counts once per expert
    C = np.rint(M.T @ M).astype(np.int64)
    np.fill_diagonal(C, 0)
    return C


def transition(top1_a_N: np.ndarray, top1_b_N: np.ndarray, num_experts: int) -> np.ndarray:
    """``[E, E]`` row-normalised: P(top-1 expert f in the next layer | top-1 expert e in this one)."""
    counts = np.zeros((num_experts, num_experts), dtype=np.float64)
    np.add.at(counts, (top1_a_N.astype(np.int64), top1_b_N.astype(np.int64)), 1.0)
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def layer_metrics(trace: Trace, layer: int) -> dict[str, Any]:
    """Every per-layer number (module doc), JSON-able."""
    E = trace.num_experts
    la, valid_A = _valid_assignments(trace, layer)
    expert_A = la["a_expert"][valid_A].astype(np.int64)
    kept_A = la["a_kept"][valid_A].astype(bool)
    weight_A = la["a_weight"][valid_A].astype(np.float64)
    load = load_counts(expert_A, E)
    kept_load = load_counts(expert_A[kept_A], E)
    dropped = load - kept_load
    weight_sum = np.bincount(expert_A, weights=weight_A, minlength=E)
    valid_N = trace.array("valid").astype(bool)
    margin = la["margin"][valid_N].astype(np.float64)
    out: dict[str, Any] = {
        "layer": layer,
        "tokens": int(valid_N.sum()),
        "assignments": int(load.sum()),
        "load": load.tolist(),
        "kept_load": kept_load.tolist(),
        "load_fraction": (load / max(1, load.sum())).tolist(),
        **balance_stats(load),
        "dead_experts": [int(e) for e in np.flatnonzero(load == 0)],
        "drop_rate": float(dropped.sum() / max(1, load.sum())),
        "drop_rate_per_expert": np.divide(dropped, load, out=np.zeros(E), where=load > 0).tolist(),
        "mean_weight": np.divide(weight_sum, load, out=np.zeros(E), where=load > 0).tolist(),
        "top1_margin": float(margin.mean()) if margin.size else 0.0,
        "coactivation": coactivation(la["a_token"][valid_A], expert_A, E).tolist(),
    }
    return out


def trace_metrics(trace: Trace) -> dict[str, Any]:
    """``{"layers": [per-layer metrics], "transitions": [{from, to, matrix}]}`` for a trace."""
    layers = trace.layers
    valid_N = trace.array("valid").astype(bool)
    transitions = []
    for a, b in itertools.pairwise(layers):
        m = transition(trace.layer(a)["top1"][valid_N], trace.layer(b)["top1"][valid_N], trace.num_experts)
        transitions.append({"from": a, "to": b, "matrix": m.tolist()})
    return {"layers": [layer_metrics(trace, i) for i in layers], "transitions": transitions}

"""Expert specialisation: does the choice of expert depend on the domain, language, position or token?

OpenMoE asked these questions (seeds/004): experts specialised little by domain, somewhat by
natural language, not by position, and strongly by token id. Here each is one number per layer:
the normalised mutual information (NMI) between a token's top-1 expert X and a label Y,

    I(X; Y) = Σ p(x, y) log p(x, y) / (p(x) p(y)),   NMI = 2 I / (H(X) + H(Y))   ("arithmetic")

which is 1 when the expert determines the label and vice versa, 0 when they are independent.
Finite samples bias I upwards (most for labels with many values, like token ids), so every NMI
comes with:
- a **shuffled-label baseline**: the NMI after permuting the labels (kills any dependence but
  keeps both marginals), mean and central interval over ``n_shuffle`` permutations;
- a **bootstrap interval** resampling *documents* with replacement (tokens of one document share
  its labels, so resampling tokens would understate the spread); the basic (reflected) interval
  ``[2·NMI − q_hi, 2·NMI − q_lo]``, because resampling biases NMI upwards as sampling does.
An NMI inside the baseline's interval is no evidence of specialisation. ``uncertainty`` =
I / H(X) is also reported: the share of the expert choice's entropy the label explains (for
token ids it is the readable one: "how much of routing is a lookup on the token").

Also per expert: its top tokens (by count and by lift = P(token | expert) / P(token)) and its
label distribution ("what does expert 5 of layer 3 like?").

Legend: N tokens, E experts, V label values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.analysis.trace import Trace

NORMALISERS = {
    "arithmetic": lambda hx, hy: (hx + hy) / 2,
    "geometric": lambda hx, hy: np.sqrt(hx * hy),
    "max": max,
    "min": min,
}


def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def mutual_information(x_N: np.ndarray, y_N: np.ndarray, weights_N: np.ndarray | None = None) -> tuple[float, float, float]:
    """``(I(X;Y), H(X), H(Y))`` in nats from paired integer samples (optionally weighted)."""
    _, xi = np.unique(x_N, return_inverse=True)
    _, yi = np.unique(y_N, return_inverse=True)
    nx, ny = int(xi.max()) + 1 if xi.size else 0, int(yi.max()) + 1 if yi.size else 0
    if nx == 0:
        return 0.0, 0.0, 0.0
    w = np.ones(len(xi)) if weights_N is None else weights_N.astype(np.float64)
    joint = np.bincount(xi.astype(np.int64) * ny + yi, weights=w, minlength=nx * ny)
    hx = _entropy(np.bincount(xi, weights=w, minlength=nx))
    hy = _entropy(np.bincount(yi, weights=w, minlength=ny))
    hxy = _entropy(joint)
    return max(0.0, hx + hy - hxy), hx, hy


def nmi(x_N: np.ndarray, y_N: np.ndarray, norm: str = "arithmetic", weights_N: np.ndarray | None = None) -> float:
    """Normalised mutual information of two labelings (0 when either is constant)."""
    i, hx, hy = mutual_information(x_N, y_N, weights_N)
    denom = NORMALISERS[norm](hx, hy)
    return float(i / denom) if denom > 0 else 0.0


def position_buckets(position_N: np.ndarray, seq_len: int, buckets: int = 8) -> np.ndarray:
    """Equal-width buckets of the position in the sequence (``buckets`` of them)."""
    return np.minimum(position_N.astype(np.int64) * buckets // max(1, seq_len), buckets - 1)


def nmi_with_baseline(
    expert_N: np.ndarray,
    label_N: np.ndarray,
    doc_N: np.ndarray | None,
    n_shuffle: int = 20,
    n_boot: int = 20,
    ci: float = 0.95,
    seed: int = 0,
    norm: str = "arithmetic",
) -> dict[str, float]:
    """NMI, its document-bootstrap interval and the shuffled-label baseline (module doc)."""
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
    i, hx, _ = mutual_information(expert_N, label_N)
    value = nmi(expert_N, label_N, norm)
    shuffled = [nmi(expert_N, rng.permutation(label_N), norm) for _ in range(n_shuffle)]
    boots = []
    if doc_N is not None and n_boot > 0:
        _, doc_idx = np.unique(doc_N, return_inverse=True)
        n_docs = int(doc_idx.max()) + 1
        for _ in range(n_boot):
            mult = np.bincount(rng.integers(0, n_docs, n_docs), minlength=n_docs).astype(np.float64)
            boots.append(nmi(expert_N, label_N, norm, weights_N=mult[doc_idx]))
    return {
        "nmi": value,
        "uncertainty": float(i / hx) if hx > 0 else 0.0,
        # basic (reflected) bootstrap: resampled NMI is biased upwards like the estimate itself, so
        # the percentile interval would sit above the estimate; reflecting it corrects that bias
        "ci_low": max(0.0, 2 * value - float(np.percentile(boots, hi_q))) if boots else value,
        "ci_high": min(1.0, 2 * value - float(np.percentile(boots, lo_q))) if boots else value,
        "baseline_mean": float(np.mean(shuffled)) if shuffled else 0.0,
        "baseline_low": float(np.percentile(shuffled, lo_q)) if shuffled else 0.0,
        "baseline_high": float(np.percentile(shuffled, hi_q)) if shuffled else 0.0,
    }


def trace_labels(trace: Trace, buckets: int = 8) -> dict[str, np.ndarray]:
    """Every label of the trace's valid tokens: its ``label.*`` arrays, ``position`` buckets, ``token`` id."""
    valid = trace.array("valid").astype(bool)
    out = {name: trace.array(f"label.{name}")[valid] for name in trace.labels()}
    out["position"] = position_buckets(trace.array("position")[valid], int(trace.meta["seq_len"]), buckets)
    out["token"] = trace.array("token")[valid]
    return out


def specialization(
    trace: Trace, n_shuffle: int = 20, n_boot: int = 20, seed: int = 0, max_tokens: int | None = 200_000
) -> dict[str, Any]:
    """``{"labels": [...], "layers": [{"layer", "by_label": {label: nmi stats}}]}`` over top-1 experts.

    ``max_tokens`` subsamples (evenly, whole trace) to bound the cost of the permutations.
    """
    valid = trace.array("valid").astype(bool)
    labels = trace_labels(trace)
    doc = trace.array("doc")[valid] if "doc" in trace.names() else None
    n = int(valid.sum())
    take = np.arange(n) if max_tokens is None or n <= max_tokens else np.linspace(0, n - 1, max_tokens).astype(np.int64)
    layers = []
    for layer in trace.layers:
        top1 = trace.layer(layer)["top1"][valid][take]
        by_label = {
            name: nmi_with_baseline(top1, y[take], None if doc is None else doc[take], n_shuffle, n_boot, seed=seed)
            for name, y in labels.items()
            if len(np.unique(y)) > 1
        }
        layers.append({"layer": layer, "by_label": by_label})
    return {"labels": [k for k in labels if any(k in la["by_label"] for la in layers)], "tokens": len(take), "layers": layers}


def expert_profiles(
    trace: Trace, decode: Any = None, top_n: int = 8, min_count: int = 5
) -> dict[str, Any]:
    """Per layer and expert: share of tokens, top tokens by count and by lift, label distribution.

    ``decode`` maps a token id to a string (e.g. ``lambda i: tokenizer.decode([i])``).
    """
    valid = trace.array("valid").astype(bool)
    token = trace.array("token")[valid].astype(np.int64)
    names = trace.label_names
    label_arrays = {name: trace.array(f"label.{name}")[valid] for name in trace.labels()}
    token_counts = np.bincount(token)
    p_token = token_counts / max(1, token_counts.sum())
    show = decode or str
    out: dict[str, Any] = {}
    for layer in trace.layers:
        top1 = trace.layer(layer)["top1"][valid].astype(np.int64)
        experts = []
        for e in range(trace.num_experts):
            mine = top1 == e
            n_e = int(mine.sum())
            entry: dict[str, Any] = {"expert": e, "share": n_e / max(1, len(top1))}
            if n_e:
                counts = np.bincount(token[mine], minlength=len(token_counts))
                by_count = np.argsort(-counts, kind="stable")[:top_n]
                lift = np.where(counts >= min_count, (counts / n_e) / np.maximum(p_token, 1e-12), 0.0)
                order = np.lexsort((-counts, -lift))  # highest lift, frequent tokens first among ties
                by_lift = [t for t in order[:top_n] if lift[t] > 0]
                entry["top_tokens"] = [[show(int(t)), int(counts[t])] for t in by_count if counts[t] > 0]
                entry["top_lift"] = [[show(int(t)), round(float(lift[t]), 2)] for t in by_lift]
                entry["labels"] = {}
                for name, arr in label_arrays.items():
                    c = np.bincount(arr[mine].astype(np.int64), minlength=len(names.get(name, [])))
                    vals = names.get(name) or [str(i) for i in range(len(c))]
                    entry["labels"][name] = {vals[i]: round(float(c[i] / n_e), 4) for i in np.flatnonzero(c)}
            experts.append(entry)
        out[str(layer)] = experts
    return out

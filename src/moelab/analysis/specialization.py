"""Expert specialisation: does the choice of expert depend on the domain, language, position or token?

OpenMoE asked these questions (seeds/004): experts specialised little by domain, somewhat by
natural language, not by position, and strongly by token id. Here each is one number per layer:
the normalised mutual information (NMI) between a token's top-1 expert X and a label Y,

    I(X; Y) = Σ p(x, y) log p(x, y) / (p(x) p(y)),   NMI = 2 I / (H(X) + H(Y))   ("arithmetic")

which is 1 when the expert determines the label and vice versa, 0 when they are independent.
Finite samples bias I upwards (most for labels with many values, like token ids), and a
randomly initialised router already routes by token id, so every NMI comes with (see
:mod:`moelab.analysis.corrected` for the choices and why):
- a **shuffled-label baseline** whose permutation respects the label's unit (document-level labels
  permuted between documents, token-level ones between tokens) and ``corrected = nmi − baseline``;
- a **document-resampling interval** (``ci_low``, ``ci_high``) of the *corrected* NMI: replicates of
  half the documents, each corrected by its own baseline; a normal interval centred on the estimate;
- with a step-0 trace, the same statistics of the **untrained router** (``step0``) and the ``gain``.
A corrected NMI whose interval covers 0 is no evidence of specialisation; one that does not exceed
its step-0 value is no evidence that *training* made it. ``uncertainty`` = I / H(X) is also
reported: the share of the expert choice's entropy the label explains (for token ids it is the
readable one: "how much of routing is a lookup on the token").

Also per expert: its top tokens (by count and by lift = P(token | expert) / P(token)) and its
label distribution ("what does expert 5 of layer 3 like?").

Legend: N tokens, E experts, V label values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.analysis.corrected import NORMALISERS, corrected_nmi, entropy, label_unit
from moelab.analysis.trace import Trace
from moelab.errors import UserError

__all__ = [
    "NORMALISERS", "expert_profiles", "label_unit", "mutual_information", "nmi", "nmi_with_baseline",
    "position_buckets", "specialization", "trace_labels",
]

def mutual_information(x_N: np.ndarray, y_N: np.ndarray, weights_N: np.ndarray | None = None) -> tuple[float, float, float]:
    """``(I(X;Y), H(X), H(Y))`` in nats from paired integer samples (optionally weighted)."""
    _, xi = np.unique(x_N, return_inverse=True)
    _, yi = np.unique(y_N, return_inverse=True)
    nx, ny = int(xi.max()) + 1 if xi.size else 0, int(yi.max()) + 1 if yi.size else 0
    if nx == 0:
        return 0.0, 0.0, 0.0
    w = np.ones(len(xi)) if weights_N is None else weights_N.astype(np.float64)
    joint = np.bincount(xi.astype(np.int64) * ny + yi, weights=w, minlength=nx * ny)
    hx = entropy(np.bincount(xi, weights=w, minlength=nx))
    hy = entropy(np.bincount(yi, weights=w, minlength=ny))
    hxy = entropy(joint)
    return max(0.0, hx + hy - hxy), hx, hy


def nmi(x_N: np.ndarray, y_N: np.ndarray, norm: str = "arithmetic", weights_N: np.ndarray | None = None) -> float:
    """Normalised mutual information of two labelings (0 when either is constant)."""
    i, hx, hy = mutual_information(x_N, y_N, weights_N)
    denom = NORMALISERS[norm](hx, hy)
    return float(i / denom) if denom > 0 else 0.0


def position_buckets(position_N: np.ndarray, seq_len: int, buckets: int = 8) -> np.ndarray:
    """Equal-width buckets of the position in the sequence (``buckets`` of them)."""
    return np.minimum(position_N.astype(np.int64) * buckets // max(1, seq_len), buckets - 1)


nmi_with_baseline = corrected_nmi  # the name callers used before the correction; same arguments first


def trace_labels(trace: Trace, buckets: int = 8) -> dict[str, np.ndarray]:
    """Every label of the trace's valid tokens: its ``label.*`` arrays, ``position`` buckets, ``token`` id."""
    valid = trace.array("valid").astype(bool)
    out = {name: trace.array(f"label.{name}")[valid] for name in trace.labels()}
    out["position"] = position_buckets(trace.array("position")[valid], int(trace.meta["seq_len"]), buckets)
    out["token"] = trace.array("token")[valid]
    return out


def _same_tokens(trace: Trace, initial: Trace) -> None:
    if trace.layers != initial.layers:
        raise UserError(f"the step-0 trace has MoE layers {initial.layers}, the trained one {trace.layers}")
    for key in ("token", "valid"):
        if not np.array_equal(trace.array(key), initial.array(key)):
            raise UserError(f"the step-0 trace covers other tokens than the trained one ({key!r} differs): "
                            "trace both models on the same data, batch size and token budget")


def specialization(
    trace: Trace,
    n_shuffle: int = 20,
    n_boot: int = 20,
    seed: int = 0,
    max_tokens: int | None = 200_000,
    initial: Trace | None = None,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Corrected NMI of top-1 expert and every label, per layer (module doc), JSON-able::

        {"labels": [...], "tokens": N, "units": {label: "document" | "token"},
         "method": {...how the null and interval were built...}, "step0": bool,
         "layers": [{"layer", "by_label": {label: corrected_nmi(...) stats}}]}

    ``initial`` is the step-0 (untrained) model's trace of the same tokens: each entry then has
    ``step0``, ``gain``, ``gain_ci_low``, ``gain_ci_high``. ``max_tokens`` subsamples (evenly, whole
    trace) to bound the cost of the permutations.
    """
    if initial is not None:
        _same_tokens(trace, initial)
    valid = trace.array("valid").astype(bool)
    labels = trace_labels(trace)
    doc = trace.array("doc")[valid] if "doc" in trace.names() else None
    n = int(valid.sum())
    take = np.arange(n) if max_tokens is None or n <= max_tokens else np.linspace(0, n - 1, max_tokens).astype(np.int64)
    doc_t = None if doc is None else doc[take]
    kept = {name: y[take] for name, y in labels.items() if len(np.unique(y[take])) > 1}
    units = {name: label_unit(y, doc_t) for name, y in kept.items()}
    layers = []
    for layer in trace.layers:
        top1 = trace.layer(layer)["top1"][valid][take]
        top1_0 = None if initial is None else initial.layer(layer)["top1"][valid][take]
        by_label = {
            name: corrected_nmi(top1, y, doc_t, n_shuffle, n_boot, ci, seed, unit=units[name], initial_expert_N=top1_0)
            for name, y in kept.items()
        }
        layers.append({"layer": layer, "by_label": by_label})
    method = {
        "statistic": "corrected = nmi - baseline_mean (arithmetic NMI of top-1 expert and label)",
        "null": "labels constant within documents permuted between documents; others between tokens",
        "interval": f"normal: corrected ± z·sd, sd over {n_boot} replicates of half the documents "
        "(without replacement), each corrected by its own shuffled baseline" if doc is not None and n_boot > 0 else "none",
        "level": ci,
        "n_shuffle": n_shuffle,
        "n_boot": n_boot if doc is not None else 0,
    }
    return {"labels": list(kept), "tokens": len(take), "units": units, "method": method, "step0": initial is not None,
            "layers": layers}


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

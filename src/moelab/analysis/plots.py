"""Matplotlib figures of an analysis.json, as PNG bytes (one function per report section).

Every function takes the plain JSON dict (so ``moelab compare`` or a notebook can redraw a
saved analysis) and returns ``{plot_name: png_bytes}``; a section whose data is absent gives
no plots. Agg backend, no display needed.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def load_plots(a: dict[str, Any]) -> dict[str, bytes]:
    m = a.get("metrics")
    if not m or not m["layers"]:
        return {}
    layers = m["layers"]
    frac = np.array([la["load_fraction"] for la in layers])
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(layers) + 2.5))
    im = axes[0].imshow(frac, aspect="auto", cmap="viridis")
    axes[0].set_yticks(range(len(layers)), [f"layer {la['layer']}" for la in layers])
    axes[0].set_xlabel("expert")
    axes[0].set_title("load fraction (before drops)")
    fig.colorbar(im, ax=axes[0])
    x = np.arange(len(layers))
    axes[1].bar(x - 0.2, [la["cv"] for la in layers], 0.4, label="CV of loads")
    axes[1].bar(x + 0.2, [la["entropy"] for la in layers], 0.4, label="normalised entropy")
    axes[1].set_xticks(x, [str(la["layer"]) for la in layers])
    axes[1].set_xlabel("layer")
    axes[1].legend()
    axes[1].set_title("balance")
    out = {"load": _png(fig)}
    n = len(layers)
    fig, axes = plt.subplots(2, n, figsize=(3 * n + 1, 6), squeeze=False)
    for j, la in enumerate(layers):
        c = np.array(la["coactivation"], dtype=float)
        axes[0, j].imshow(c / max(1.0, c.max()), cmap="magma")
        axes[0, j].set_title(f"co-activation L{la['layer']}")
    for j in range(n):
        if j < len(m["transitions"]):
            t = m["transitions"][j]
            axes[1, j].imshow(np.array(t["matrix"]), cmap="Blues", vmin=0, vmax=1)
            axes[1, j].set_title(f"top-1 L{t['from']} → L{t['to']}")
        else:
            axes[1, j].axis("off")
    out["coactivation"] = _png(fig)
    return out


def specialization_plots(a: dict[str, Any]) -> dict[str, bytes]:
    s = a.get("specialization")
    if not s or not s["layers"]:
        return {}
    labels = s["labels"]
    fig, ax = plt.subplots(figsize=(8, 4))
    layers = [la["layer"] for la in s["layers"]]
    width = 0.8 / max(1, len(labels))
    for j, name in enumerate(labels):
        x = np.arange(len(layers)) + (j - (len(labels) - 1) / 2) * width
        st = [la["by_label"].get(name) for la in s["layers"]]
        val = [v["nmi"] if v else 0 for v in st]
        # the document bootstrap is not centred on the estimate: clip so the bar shows its side of it
        err = [[max(0.0, v["nmi"] - v["ci_low"]) if v else 0 for v in st], [max(0.0, v["ci_high"] - v["nmi"]) if v else 0 for v in st]]
        ax.bar(x, val, width, yerr=err, label=name, capsize=2)
        ax.scatter(x, [v["baseline_high"] if v else 0 for v in st], marker="_", color="k", s=80)
    ax.set_xticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_ylabel("NMI(top-1 expert; label)")
    ax.set_title("specialisation (black tick: shuffled-label baseline, upper end)")
    ax.legend(fontsize=8)
    return {"specialization": _png(fig)}


def drift_plots(a: dict[str, Any]) -> dict[str, bytes]:
    d = a.get("drift")
    if not d or not d.get("layers"):
        return {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer, shares in d["layers"].items():
        ax.plot(d["steps"], shares, marker="o", label=f"layer {layer}")
    if d.get("num_experts"):
        ax.axhline(1.0 / d["num_experts"], color="gray", linestyle="--", label="chance 1/E")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("training step")
    ax.set_ylabel("top-1 expert = final checkpoint's")
    ax.legend(fontsize=8)
    return {"drift": _png(fig)}


def drops_plots(a: dict[str, Any]) -> dict[str, bytes]:
    out = {}
    for key in ("drops", "drops_score"):
        d = a.get(key)
        if not d or not d.get("layers"):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for layer, c in d["layers"].items():
            ax.plot(c["position"], c["drop_rate"], marker=".", label=f"layer {layer}")
        ax.set_xlabel("position in the capacity group (fraction)")
        ax.set_ylabel("drop rate")
        ax.set_title(f"capacity factor {d.get('capacity_factor')}, policy {d.get('policy')}")
        ax.legend(fontsize=8)
        out[key] = _png(fig)
    return out


def conflict_plots(a: dict[str, Any]) -> dict[str, bytes]:
    g = a.get("gradient_conflict")
    if not g:
        return {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in g.items():
        layers = list(res["layers"])
        ax.plot([int(i) for i in layers], [res["layers"][i]["mean_offdiag"] for i in layers], marker="o", label=f"{name}: whole FFN")
        pe = [(int(i), res["layers"][i]["per_expert_mean_offdiag"]) for i in layers if "per_expert_mean_offdiag" in res["layers"][i]]
        if pe:
            ax.plot(*zip(*pe), marker="s", linestyle="--", label=f"{name}: within an expert")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean cosine between domain gradients")
    ax.legend(fontsize=8)
    return {"gradient_conflict": _png(fig)}


def sparsity_plots(a: dict[str, Any]) -> dict[str, bytes]:
    s = a.get("sparsity")
    if not s or not s.get("layers"):
        return {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer, r in s["layers"].items():
        taus = [float(t) for t in r["active_fraction"]]
        ax.plot(taus, list(r["active_fraction"].values()), marker="o", label=f"layer {layer}")
    ax.axhspan(0.2, 0.5, color="orange", alpha=0.15, label="seed claim 20–50%")
    ax.set_xscale("log")
    ax.set_xlabel("threshold τ (relative to the token's largest activation)")
    ax.set_ylabel("share of FFN neurons active")
    ax.legend(fontsize=8)
    return {"sparsity": _png(fig)}


PLOTTERS = (load_plots, specialization_plots, drift_plots, drops_plots, conflict_plots, sparsity_plots)


def make_plots(analysis: dict[str, Any]) -> dict[str, bytes]:
    """Every plot an analysis.json supports, by name."""
    out: dict[str, bytes] = {}
    for fn in PLOTTERS:
        out.update(fn(analysis))
    return out

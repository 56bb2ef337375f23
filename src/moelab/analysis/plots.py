"""Matplotlib figures of an analysis.json, as PNG bytes (one function per report section).

Every function takes the plain JSON dict (so ``moelab compare`` or a notebook can redraw a
saved analysis) and returns ``{plot_name: png_bytes}``; a section whose data is absent gives
no plots. Every heatmap is drawn by :func:`heatmap`: a colour bar with its scale and a title
that says what the colour means. Agg backend, no display needed.
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


def heatmap(ax: Any, matrix: Any, title: str, colour: str, cmap: str = "viridis", vmin: float | None = None,
            vmax: float | None = None, xlabel: str = "expert", ylabel: str | None = None) -> Any:
    """Draw ``matrix`` on ``ax`` with a colour bar labelled ``colour`` (what the colour measures) and a title."""
    m = np.asarray(matrix, dtype=float)
    im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    for n, set_ticks in zip(m.shape, (ax.set_yticks, ax.set_xticks)):
        if n <= 32:  # whole expert numbers, not the image's half-cell edges
            set_ticks(range(n))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(colour, fontsize=8)
    return im


def load_plots(a: dict[str, Any]) -> dict[str, bytes]:
    m = a.get("metrics")
    if not m or not m["layers"]:
        return {}
    layers = m["layers"]
    frac = np.array([la["load_fraction"] for la in layers])
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(layers) + 2.5))
    heatmap(axes[0], frac, "load per expert (colour: share of the layer's assignments, before drops)",
            "share of assignments", vmin=0)
    axes[0].set_yticks(range(len(layers)), [f"layer {la['layer']}" for la in layers])
    x = np.arange(len(layers))
    axes[1].bar(x - 0.2, [la["cv"] for la in layers], 0.4, label="CV of loads")
    axes[1].bar(x + 0.2, [la["entropy"] for la in layers], 0.4, label="normalised entropy")
    axes[1].set_xticks(x, [str(la["layer"]) for la in layers])
    axes[1].set_xlabel("layer")
    axes[1].legend()
    axes[1].set_title("balance")
    out = {"load": _png(fig)}
    n = len(layers)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 1, 6.5), squeeze=False)
    for j, la in enumerate(layers):
        c = np.array(la["coactivation"], dtype=float)
        heatmap(axes[0, j], c / max(1.0, c.max()), f"co-activation L{la['layer']}\n(colour: tokens choosing both, / max)",
                "tokens choosing both experts / max pair", cmap="magma", vmin=0, vmax=1, ylabel="expert")
    for j in range(n):
        if j < len(m["transitions"]):
            t = m["transitions"][j]
            heatmap(axes[1, j], t["matrix"], f"top-1 L{t['from']} → L{t['to']}\n(colour: P(next top-1 | this top-1))",
                    "P(next layer's top-1 | this layer's)", cmap="Blues", vmin=0, vmax=1,
                    xlabel=f"top-1 expert in L{t['to']}", ylabel=f"top-1 expert in L{t['from']}")
        else:
            axes[1, j].axis("off")
    out["coactivation"] = _png(fig)
    return out


def specialization_plots(a: dict[str, Any]) -> dict[str, bytes]:
    """Corrected NMI per layer and label with its interval (filled dots); the step-0 router's as hollow dots."""
    from moelab.analysis.corrected import corrected_of

    s = a.get("specialization")
    if not s or not s["layers"]:
        return {}
    labels = s["labels"]
    fig, ax = plt.subplots(figsize=(8, 4))
    layers = [la["layer"] for la in s["layers"]]
    width = 0.8 / max(1, len(labels))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, name in enumerate(labels):
        x = np.arange(len(layers)) + (j - (len(labels) - 1) / 2) * width
        st = [la["by_label"].get(name) for la in s["layers"]]
        pts = [(xi, v) for xi, v in zip(x, st) if v]
        if not pts:
            continue
        xs = np.array([p[0] for p in pts])
        val = np.array([corrected_of(v) for _, v in pts])
        err = [val - np.array([v["ci_low"] for _, v in pts]), np.array([v["ci_high"] for _, v in pts]) - val]
        colour = colours[j % len(colours)]
        ax.errorbar(xs, val, yerr=np.maximum(err, 0), fmt="o", color=colour, capsize=3, label=f"{name} ({pts[0][1].get('unit', 'token')})")
        step0 = [(xi, v["step0"]) for xi, v in pts if v.get("step0")]
        if step0:
            ax.scatter([p[0] for p in step0], [p[1]["corrected"] for p in step0], marker="o", facecolors="none",
                       edgecolors=colour, s=60, zorder=3)
    if s.get("step0"):
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label="hollow: step-0 router")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_ylabel("corrected NMI (NMI − shuffled baseline)")
    ax.set_title("specialisation: corrected NMI with 95% interval (label (null unit))", fontsize=10)
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

"""The compare report's figures, built from a ``summary.json`` dict (matplotlib, Agg).

Each ``*_figure`` function returns a matplotlib ``Figure`` (or None when the summary has nothing
to draw) so that tests can look at what was drawn (a band, a zero line, whiskers, a colour bar);
:func:`make_plots` turns them into PNG data URIs for the self-contained page.

Why dots with whiskers and zero lines: the question is "is MoE − twin below 0, and by how much
could it be off?". A bar from 0 per model hides a 0.02-nat gap under two tall bars; a dot for the
paired difference with its interval, next to a line at 0, shows it directly. With one seed there
is no interval: the dot is drawn without whiskers and the title says so.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

COLORS = {"moe": "#d62728", "dense_iso_active": "#1f77b4", "dense_iso_total": "#2ca02c"}
MAX_LANG_PLOT = 12  # more languages than this: table only, a dot plot would be unreadable


def _nan(x: Any) -> float:
    """A float for plotting: None/NaN/missing → NaN (matplotlib leaves a gap)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _smooth(xs: list[float], k: int = 5) -> list[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_figure(models: dict[str, Any], flops: bool = False):
    """Validation loss (means, dots) against steps (with smoothed train loss) or training FLOPs; each seed thin."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, m in models.items():
        h, c = m["history"], COLORS.get(name)
        scale = m["flops_per_token"]

        def x_of(hh: dict[str, list[float]], scale: float = scale) -> list[float]:
            return [t * scale for t in hh["eval_tokens"]] if flops else hh["eval_steps"]

        if not flops:
            ax.plot(h["steps"], _smooth(h["loss"]), color=c, alpha=0.5, label=f"{name} train (smoothed)")
        for r in m.get("per_seed") or []:
            if r.get("history"):
                ax.plot(x_of(r["history"]), r["history"]["val_loss"], "-", color=c, lw=0.7, alpha=0.35)
        ax.plot(x_of(h), h["val_loss"], "o-", color=c, label=f"{name} validation (mean)")
    if flops:
        ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (moelab calc: active matmuls + attention, × 3)" if flops else "optimizer step")
    ax.set_ylabel("loss (nats/token)")
    if any(m.get("per_seed") for m in models.values()):
        ax.set_title("thin lines: each seed's validation loss", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _level(d: dict[str, Any]) -> float:
    ti = ((d.get("verdict") or {}).get("comparison") or {}).get("t_interval") or {}
    level = _nan(ti.get("level"))
    return level if math.isfinite(level) else 0.95


def _flops_label(curve: dict[str, Any]) -> str:
    moe, twin = curve.get("moe_flops") or [], curve.get("twin_flops") or []
    if moe and twin and _nan(moe[-1]) > 0:
        return f"MoE training FLOPs (the twin had spent {twin[-1] / moe[-1]:.2f}× as many at each point)"
    return "MoE training FLOPs"


def difference_figure(summary: dict[str, Any]):
    """Per twin (one row each): MoE − twin validation loss, paired by seed, over steps and over FLOPs.

    The mean difference as dots, each seed's difference thin and grey, the interval over seeds as a
    band (absent with one seed), and a zero line. The curve is read at equal *steps* (same data seen);
    the FLOPs panel puts the same points at the MoE's FLOPs and says how many more the twin had spent.
    """
    curves = {t: d for t, d in (summary.get("differences") or {}).items() if d.get("curve")}
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(curves), 2, figsize=(10, 3.2 * len(curves)), squeeze=False)
    for (twin, d), row in zip(curves.items(), axes):
        cv = d["curve"]
        mean, low, high = ([_nan(x) for x in cv.get(k) or []] for k in ("mean", "low", "high"))
        band = any(math.isfinite(x) for x in low + high)
        color = COLORS.get(twin, "C0")
        for ax, xs, xlabel in ((row[0], cv["eval_steps"], "optimizer step"), (row[1], cv["moe_flops"], _flops_label(cv))):
            for seed_diffs in cv.get("per_seed") or []:
                ax.plot(xs, [_nan(x) for x in seed_diffs], "-", color="0.5", lw=0.7, alpha=0.6)
            if band:
                ax.fill_between(xs, low, high, color=color, alpha=0.25, lw=0, label=f"{_level(d):.0%} interval")
            ax.plot(xs, mean, "o-", color=color, ms=3, label="mean difference")
            ax.axhline(0.0, color="k", lw=0.9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("difference (nats/token)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        row[1].set_xscale("log")
        what = "band: interval over seeds" if band else "one seed: no interval"
        row[0].set_title(f"moe − {twin} over steps ({what}; grey: each seed)", fontsize=9)
        row[1].set_title(f"moe − {twin} over training FLOPs; below 0: MoE better", fontsize=9)
    fig.tight_layout()
    return fig


def label_difference_figure(summary: dict[str, Any], key: str, what: str):
    """Dot-and-whisker: per label (``key`` = "by_domain" | "by_lang"), MoE − twin with its t interval, a zero line."""
    diffs = summary.get("differences") or {}
    labels = sorted({lab for d in diffs.values() for lab in d.get(key) or {}})
    if not labels:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 1.4 + 0.4 * len(labels) * len(diffs)))
    step = 0.8 / len(diffs)
    any_interval = False
    for j, (twin, d) in enumerate(diffs.items()):
        ys, xs, lo, hi = [], [], [], []
        for i, lab in enumerate(labels):
            c = (d.get(key) or {}).get(lab) or {}
            m = _nan(c.get("mean"))
            if not math.isfinite(m):
                continue
            ti = c.get("t_interval") or {}
            a, b = _nan(ti.get("low")), _nan(ti.get("high"))
            has = math.isfinite(a) and math.isfinite(b)
            any_interval |= has
            ys.append(i + (j - (len(diffs) - 1) / 2) * step)
            xs.append(m)
            lo.append(m - a if has else 0.0)
            hi.append(b - m if has else 0.0)
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", color=COLORS.get(twin, f"C{j}"), capsize=3, label=f"moe − {twin}")
    ax.axvline(0.0, color="k", lw=0.9)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel("MoE − twin validation loss (nats/token); left of 0: MoE better")
    tail = "with its interval over seeds" if any_interval else "(one seed: no interval)"
    ax.set_title(f"per {what}: mean paired difference {tail}", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    return fig


def domain_loss_figure(models: dict[str, Any]):
    """Absolute validation loss per domain: a dot per model (mean), small dots per seed; no bars from 0."""
    domains = sorted({d for m in models.values() for d in m.get("val_loss_by_domain") or {}})
    if not domains:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.3 * len(domains) * len(models)))
    step = 0.8 / len(models)
    for j, (name, m) in enumerate(models.items()):
        off = (j - (len(models) - 1) / 2) * step
        for r in m.get("per_seed") or []:
            got = r.get("val_loss_by_domain") or {}
            pts = [(got[d], i + off) for i, d in enumerate(domains) if d in got]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", color=COLORS.get(name), alpha=0.4, ms=4)
        by = m.get("val_loss_by_domain") or {}
        xs = [_nan(by.get(d)) for d in domains]
        ax.plot(xs, [i + off for i in range(len(domains))], "o", color=COLORS.get(name), label=name)
    ax.set_yticks(range(len(domains)), domains)
    ax.set_ylim(len(domains) - 0.5, -0.5)
    ax.set_xlabel("validation loss (nats/token); big dot: mean, small dots: seeds")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    return fig


def expert_load_figure(load: dict[str, list[float]]):
    """Heatmap of each layer's share of routing assignments per expert, with a colour bar and a title."""
    if not load:
        return None
    plt = _plt()
    layers = sorted(load, key=int)
    grid = [load[k] for k in layers]
    E, top = len(grid[0]), max(map(max, grid))
    fig, ax = plt.subplots(figsize=(6.5, 0.6 * len(layers) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(layers)), [f"layer {k}" for k in layers])
    ax.set_xticks(range(E))
    ax.set_xlabel("expert")
    fig.colorbar(im, ax=ax, label="share of the layer's assignments")
    for i, row in enumerate(grid):
        for e, v in enumerate(row):
            ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < top * 0.6 else "k")
    ax.set_title(f"MoE expert load on validation tokens\ncolour = share of assignments (balanced = 1/E = {1 / E:.3f})",
                 fontsize=9)
    return fig


def make_plots(summary: dict[str, Any]) -> dict[str, str]:
    """Plots as data URIs: loss vs steps and FLOPs, the paired differences, per domain/language, expert load."""
    models = summary["models"]
    figs = {
        "loss_vs_steps": loss_figure(models, flops=False),
        "loss_vs_flops": loss_figure(models, flops=True),
        "difference_curves": difference_figure(summary),
        "domain_differences": label_difference_figure(summary, "by_domain", "domain"),
        "loss_by_domain": domain_loss_figure(models),
        "expert_load": expert_load_figure(models.get("moe", {}).get("expert_load") or {}),
    }
    langs = {lab for d in (summary.get("differences") or {}).values() for lab in d.get("by_lang") or {}}
    if len(langs) <= MAX_LANG_PLOT:
        figs["lang_differences"] = label_difference_figure(summary, "by_lang", "language")
    return {k: _png(fig) for k, fig in figs.items() if fig is not None}

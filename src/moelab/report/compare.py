"""The compare report: a self-contained HTML page (plots embedded as PNG data URIs) and a terminal table.

Why self-contained: a report is mailed, attached to an issue or opened from a remote machine;
it must not depend on files beside it or on the network.
"""

from __future__ import annotations

import base64
import io
from importlib import resources
from pathlib import Path
from typing import Any

import markupsafe

COLORS = {"moe": "#d62728", "dense_iso_active": "#1f77b4", "dense_iso_total": "#2ca02c"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _smooth(xs: list[float], k: int = 5) -> list[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def make_plots(summary: dict[str, Any]) -> dict[str, str]:
    """Plots as data URIs: loss vs steps, loss vs FLOPs, per-domain loss, expert load per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    plots = {}

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, m in models.items():
        h, c = m["history"], COLORS.get(name)
        ax.plot(h["steps"], _smooth(h["loss"]), color=c, alpha=0.6, label=f"{name} train (smoothed)")
        ax.plot(h["eval_steps"], h["val_loss"], "o-", color=c, label=f"{name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plots["loss_vs_steps"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, m in models.items():
        h = m["history"]
        flops = [t * m["flops_per_token"] for t in h["eval_tokens"]]
        ax.plot(flops, h["val_loss"], "o-", color=COLORS.get(name), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (moelab calc: active matmuls + attention, × 3)")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plots["loss_vs_flops"] = _png(fig)

    domains = sorted({d for m in models.values() for d in m["val_loss_by_domain"]})
    if domains:
        fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(domains) * len(models)), 4))
        width = 0.8 / len(models)
        for j, (name, m) in enumerate(models.items()):
            xs = [i + j * width for i in range(len(domains))]
            ax.bar(xs, [m["val_loss_by_domain"].get(d, float("nan")) for d in domains], width, color=COLORS.get(name), label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))], domains, rotation=20)
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        plots["loss_by_domain"] = _png(fig)

    load = models.get("moe", {}).get("expert_load", {})
    if load:
        layers = sorted(load, key=int)
        grid = [load[k] for k in layers]
        fig, ax = plt.subplots(figsize=(6.5, 0.6 * len(layers) + 1.5))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)), [f"layer {k}" for k in layers])
        ax.set_xlabel("expert")
        ax.set_xticks(range(len(grid[0])))
        fig.colorbar(im, ax=ax, label="share of assignments")
        E = len(grid[0])
        for i, row in enumerate(grid):
            for e, v in enumerate(row):
                ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < max(map(max, grid)) * 0.6 else "k")
        ax.set_title(f"MoE expert load on validation tokens (balanced = {1 / E:.3f})")
        plots["expert_load"] = _png(fig)
    return plots


def write_report(summary: dict[str, Any], path: str | Path, analysis_html: str = "") -> Path:
    """Render ``templates/compare.html.j2`` with the summary and its plots into ``path``.

    ``analysis_html`` is the routing-analysis fragment (``moelab.analysis.report.render_sections_html``).
    """
    import jinja2

    template = resources.files("moelab.report").joinpath("templates/compare.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(template).render(
        s=summary, plots=make_plots(summary), rows=table_rows(summary), analysis_html=markupsafe.Markup(analysis_html)
    )
    p = Path(path)
    p.write_text(html, encoding="utf-8")
    return p


def _objective_cells(summary: dict[str, Any], m: dict[str, Any]) -> dict[str, str]:
    """Perplexity for next-token objectives; the objective's own headline metric otherwise."""
    metric = summary.get("metric", "loss")
    if summary.get("objective", "causal") == "causal" or metric == "loss":
        return {"val ppl": f"{m['final_val_ppl']:.2f}"}
    return {f"val {metric.replace('_', ' ')}": f"{m.get('final_metric', float('nan')):.4f}"}


def table_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """One row per model: the numbers of the terminal and HTML tables, formatted."""
    rows = []
    for name, m in summary["models"].items():
        rows.append(
            {
                "model": name,
                "params (total)": f"{m['params_total'] / 1e6:.2f}M",
                "params (active)": f"{m['params_active'] / 1e6:.2f}M",
                "val loss": f"{m['final_val_loss']:.4f}",
                **_objective_cells(summary, m),
                "tok/s": f"{m['tokens_per_s']:,.0f}",
                "train FLOPs": f"{m['train_flops']:.2e}",
                "tokens": f"{m['tokens']:,}",
            }
        )
    return rows


def markdown_table(summary: dict[str, Any]) -> str:
    """The summary table as Markdown (for the README)."""
    rows = table_rows(summary)
    lines = ["| " + " | ".join(rows[0]) + " |", "|---" + "|--:" * (len(rows[0]) - 1) + "|"]
    lines += ["| " + " | ".join(f"`{v}`" if k == "model" else v for k, v in r.items()) + " |" for r in rows]
    return "\n".join(lines)


def print_table(summary: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = table_rows(summary)
    objective = summary.get("objective", "causal")
    table = Table(title=f"moelab compare: {summary['name']} (objective {objective}, metric {summary.get('metric', 'loss')})")
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r.values())
    console = console or Console()
    if not console.is_terminal:  # logs and pipes: never squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    for k, v in summary.get("verdict", {}).items():
        better = "better" if v < 0 else "worse"
        console.print(f"{k.replace('_', ' ')}: {v:+.4f} nats/token (MoE {better})")

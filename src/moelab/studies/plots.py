"""Figures of the studies: matplotlib without a display, and one way to write them.

Why a module: every study draws a PNG beside its page; the headless backend, the layout and the
file handling are the same each time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``matplotlib.pyplot.subplots`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig: Any, path: Path, dpi: int = 110) -> None:
    """Tight layout, write ``path`` (its folder created) in one step, free the figure.

    Rendered in memory, then written through :func:`moelab.outputs.atomic_write_bytes`: a figure on a
    committed page is replaced whole or not at all."""
    import io

    import matplotlib.pyplot as plt

    from moelab.outputs import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def seed_points(ax: Any, per_bar: list[list[float]]) -> None:
    """Each seed's value as a point on its bar (bar i at x = i), spread a little so that they do not hide
    each other: a reader sees the seeds behind a mean ± std."""
    for i, values in enumerate(per_bar):
        xs = [i + (j - (len(values) - 1) / 2) * 0.12 for j in range(len(values))]
        ax.scatter(xs, values, s=10, color="k", zorder=3)


def arm_bars(arms: dict[str, dict[str, Any]], metrics: list[str], path: Path, title: str = "") -> None:
    """One panel per metric: a bar per arm, mean ± std over seeds, and each seed's value as a point
    on its bar (the default figure of a study that compares arms on a few scalars: a reader sees the
    seeds, not only their mean). Loss panels zoom on the range the arms span."""
    fig, axes = subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1.5, 3.8), squeeze=False)
    names = list(arms)
    for ax, metric in zip(axes[0], metrics):
        means = [arms[a]["mean"].get(metric, float("nan")) for a in names]
        stds = [arms[a]["std"].get(metric, 0.0) for a in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.6)
        seed_points(ax, [arms[a].get("per_seed", {}).get(metric, []) for a in names])
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        finite = [m for m in means if m == m]
        if metric.endswith("loss") and finite:
            ax.set_ylim(min(finite) - 0.3, max(finite) + 0.2)
    if title:
        fig.suptitle(title, fontsize=10)
    save(fig, path)

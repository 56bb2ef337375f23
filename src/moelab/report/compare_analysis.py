"""The routing-analysis part of ``moelab compare``: the MoE's routing, read with ``moelab analyze``.

Why: a loss table says *whether* the MoE bought something; the analysis sections (load,
specialisation by domain/language/position/token, drops towards the end, gradient conflict
against the dense twin, FFN sparsity of the twin) say *what its routers did*. Compare runs the
same pipeline as ``moelab analyze`` on a small token budget, writes ``analysis/`` beside the
models and embeds the same sections in its report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Small budgets: the analysis must cost seconds next to minutes of training.
COMPARE_BUDGET = dict(max_tokens=16_384, drop_tokens=4_096, conflict_batches=2, n_shuffle=10, n_boot=10)


def run_compare_analysis(out: Path, corpus: str, seq_len: int) -> dict[str, Any]:
    """Analyse ``out/moe`` (with ``out/dense_iso_active`` as the dense twin) into ``out/analysis``.

    Returns ``{"report": relative path, "nmi": per-layer NMI table, "sections_html": fragment}``.
    """
    from moelab.analysis.pipeline import AnalyzeOptions, analyze
    from moelab.analysis.report import render_sections, render_sections_html

    dense = out / "dense_iso_active"
    opts = AnalyzeOptions(
        data=corpus,
        out=str(out / "analysis"),
        dense=str(dense) if dense.is_dir() else None,
        seq_len=seq_len,
        **COMPARE_BUDGET,
    )
    analysis = analyze(out / "moe", opts)
    return {
        "report": "analysis/report.html",
        "specialization": analysis.get("specialization", {}),
        "sections_html": render_sections_html(render_sections(analysis)),
    }

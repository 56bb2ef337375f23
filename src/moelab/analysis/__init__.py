"""Routing analysis: traces, load metrics, specialisation, drift, drops, gradient conflict, sparsity, report.

Entry points: :func:`collect` (record a trace), :class:`Trace` (load one), :func:`analyze`
(the whole ``moelab analyze`` pipeline) and :func:`render_sections` (report sections that
other reports, e.g. ``moelab compare``, can embed). See docs/analysis.md.
"""

from moelab.analysis.trace import Trace, TraceWriter, collect

__all__ = ["Trace", "TraceWriter", "analyze", "collect", "render_sections"]


def analyze(model_path, opts):
    from moelab.analysis.pipeline import analyze as _analyze

    return _analyze(model_path, opts)


def render_sections(analysis, plots=None):
    from moelab.analysis.report import render_sections as _render

    return _render(analysis, plots)

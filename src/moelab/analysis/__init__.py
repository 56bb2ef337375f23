"""Routing analysis: traces, load metrics, specialisation, drift, drops, gradient conflict, sparsity, report.

Entry points: :func:`collect` (record a trace), :class:`Trace` (load one), :func:`analyze`
(the whole ``moelab analyze`` pipeline from a checkpoint), :func:`analyze_model` (the same on
models and a split held in memory, e.g. by ``moelab compare``) and :func:`render_sections`
(report sections that other reports can embed). See docs/analysis.md.
"""

from moelab.analysis.trace import Trace, TraceWriter, collect

__all__ = ["Trace", "TraceWriter", "analyze", "analyze_model", "collect", "render_sections"]


def analyze(model_path, opts):
    from moelab.analysis.pipeline import analyze as _analyze

    return _analyze(model_path, opts)


def analyze_model(model, tokenizer, data, opts, dense_model=None, initial_model=None, **kw):
    from moelab.analysis.pipeline import analyze_model as _analyze_model

    return _analyze_model(model, tokenizer, data, opts, dense_model=dense_model, initial_model=initial_model, **kw)


def render_sections(analysis, plots=None):
    from moelab.analysis.report import render_sections as _render

    return _render(analysis, plots)

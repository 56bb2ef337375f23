"""The compare report: a self-contained HTML page (plots embedded as PNG data URIs) and a terminal table.

Why self-contained: a report is mailed, attached to an issue or opened from a remote machine;
it must not depend on files beside it or on the network.

Why the difference is drawn, not only the two curves: two loss curves 0.02 nats apart look the
same, and a bar from 0 hides that gap entirely. What a reader needs is the *paired* difference
MoE − twin (same seed = same data order and validation batches) with its interval and a zero
line: an interval that crosses zero is no evidence either way. So the page opens with the verdict
sentence(s) computed from the study's declared rule, then draws the difference over training and
per domain/language as dots with whiskers.

Input: the ``summary.json`` dict written by ``moelab compare`` (``models``, ``differences`` with
``moelab.stats`` ``Verdict``/``Comparison`` JSON, ``rule``, ``seeds``). Intervals are ``None`` (or
NaN) with one seed; every function here renders that case and says that no interval exists.
Older one-seed summaries without ``differences``/``per_seed`` still render.
"""

from __future__ import annotations

import math
import os
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import markupsafe

from moelab.report.compare_plots import COLORS, MAX_LANG_PLOT, make_plots

__all__ = ["COLORS", "make_plots", "markdown_table", "print_table", "render_report", "table_rows", "write_report"]

NO_INTERVAL = "no interval: one seed gives no spread to estimate one (run --seeds 2 or more)"


def _num(x: Any) -> float | None:
    """A finite float, or None for None/NaN/inf/missing (one-seed intervals, absent fields)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _nan(x: Any) -> float:
    v = _num(x)
    return float("nan") if v is None else v


def _fmt(x: Any, spec: str = "+.4f") -> str:
    v = _num(x)
    return "n/a" if v is None else format(v, spec)


def _interval_text(low: Any, high: Any, spec: str = "+.4f") -> str:
    lo, hi = _num(low), _num(high)
    return "no interval" if lo is None or hi is None else f"[{lo:{spec}}, {hi:{spec}}]"


def _p_text(p: Any) -> str:
    v = _num(p)
    return "n/a" if v is None else (f"{v:.2g}" if v < 0.001 else f"{v:.3f}")


# ---------------------------------------------------------------- the numbers, as the page shows them


def n_seeds(summary: dict[str, Any]) -> int:
    """How many seeds the summary averages (1 for summaries written before ``--seeds``)."""
    seeds = summary.get("seeds")
    if seeds:
        return len(seeds)
    return max((len(m.get("per_seed") or []) for m in summary["models"].values()), default=0) or 1


def rule_text(rule: dict[str, Any] | None, comparisons: int = 1) -> str:
    """The declared rule in words: "lower val_loss by ≥ 0.01 nats/token, paired t, alpha 0.05 (Holm)"."""
    if not rule:
        return "no rule declared: the difference is reported without a verdict"
    if rule.get("description"):
        return str(rule["description"])
    way = "lower" if rule.get("lower_is_better", True) else "higher"
    test = "paired t" if rule.get("paired", True) else "Welch t"
    text = f"{way} {rule.get('metric', 'val_loss')} by ≥ {rule.get('min_effect', 0.0):g} {rule.get('unit', '')}".strip()
    text += f", {test}, alpha {rule.get('alpha', 0.05):g}"
    return text + (" (Holm over the comparisons)" if comparisons > 1 else "")


def _verdict_entry(twin: str, v: dict[str, Any], unit: str) -> dict[str, Any]:
    c = v.get("comparison") or {}
    ti, bi = c.get("t_interval") or {}, c.get("bootstrap_interval") or {}
    n, below, above = int(c.get("n") or 0), int(c.get("n_below") or 0), int(c.get("n_above") or 0)
    mean, low, high = _num(c.get("mean")), _num(ti.get("low")), _num(ti.get("high"))
    sentence = v.get("sentence") or f"moe − {twin} = {_fmt(mean)} {_interval_text(low, high)} {unit}, {below}/{n} seeds lower"
    return {
        "twin": twin,
        "verdict": v.get("verdict", "inconclusive"),
        "sentence": sentence,
        "reason": v.get("reason", ""),
        "mean": mean,
        "sd": _num(c.get("sd")),
        "n": n,
        "low": low,
        "high": high,
        "level": _num(ti.get("level")) or 0.95,
        "boot_low": _num(bi.get("low")),
        "boot_high": _num(bi.get("high")),
        "p_t": _num(c.get("p_t")),
        "p_adjusted": _num(v.get("p_adjusted")),
        "p_sign": _num(c.get("p_sign")),
        "p_permutation": _num(c.get("p_permutation")),
        "n_below": below,
        "n_above": above,
        "unit": unit,
        "note": NO_INTERVAL if low is None or high is None else "",
    }


def verdicts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per twin: verdict, sentence, reason, mean difference, intervals, p-values, seeds each way.

    ``low``/``high`` are the t interval (None with one seed; then ``note`` says why). A summary
    without ``differences`` (one run per model, older format) gives its bare mean difference per twin.
    """
    unit = (summary.get("rule") or {}).get("unit", "nats/token")
    diffs = summary.get("differences") or {}
    if diffs:
        return [_verdict_entry(twin, d.get("verdict") or {}, unit) for twin, d in diffs.items()]
    out = []
    for key, value in (summary.get("verdict") or {}).items():
        twin, mean = key.removeprefix("moe_minus_"), _num(value)
        c = {"mean": mean, "n": 1, "n_below": int(mean is not None and mean < 0), "n_above": int(mean is not None and mean > 0)}
        sentence = f"moe − {twin} = {_fmt(mean)} {unit} (one seed): inconclusive"
        v = {"verdict": "inconclusive", "reason": "one run per model", "sentence": sentence, "comparison": c}
        out.append(_verdict_entry(twin, v, unit))
    return out


def _tokens_per_param(m: dict[str, Any]) -> float:
    got = _num(m.get("tokens_per_param"))
    if got is not None:
        return got
    return m["tokens"] / m["params_active"] if m.get("params_active") else float("nan")


def _count(x: float) -> str:
    """A parameter count in at most 6 characters: 0.41M, 12.35M, 123.4M, 1.50B."""
    if x >= 1e9:
        return f"{x / 1e9:.2f}B"
    return f"{x / 1e6:.2f}M" if x < 1e8 else f"{x / 1e6:.1f}M"


def _rate(x: float) -> str:
    """Tokens per second in at most 6 characters: 52,341, 123k, 1,235k, 12.3M."""
    if x < 1e5:
        return f"{x:,.0f}"
    return f"{x / 1e3:,.0f}k" if x < 1e7 else f"{x / 1e6:,.1f}M"


def _short(x: float) -> str:
    """Perplexity or tokens per parameter in at most 6 characters: 61.23, 612.3, 12,346."""
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.2f}" if x < 100 else f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _objective_cells(summary: dict[str, Any], m: dict[str, Any]) -> dict[str, str]:
    """Perplexity for next-token objectives; the objective's own headline metric otherwise."""
    metric = summary.get("metric", "loss")
    if summary.get("objective", "causal") == "causal" or metric == "loss":
        return {"val ppl": _short(m["final_val_ppl"])}
    return {f"val {metric.replace('_', ' ')}": f"{_nan(m.get('final_metric')):.4f}"}


def table_rows(summary: dict[str, Any], spread: bool = False) -> list[dict[str, str]]:
    """One row per model: the numbers of the terminal, Markdown and HTML tables, formatted.

    Every cell is at most 8 characters wide (except the model name; numbers take compact forms
    such as 1.50B, 1,235k, 12,346) so that the terminal table fits 80 columns. ``spread`` adds
    "± sd" over seeds to the validation loss (HTML, Markdown).
    """
    rows = []
    for name, m in summary["models"].items():
        loss = f"{m['final_val_loss']:.4f}"
        sd = _num(m.get("final_val_loss_sd"))
        if spread and sd is not None:
            loss += f" ± {sd:.4f}"
        rows.append(
            {
                "model": name,
                "total params": _count(m["params_total"]),
                "active params": _count(m["params_active"]),
                "tokens per param": _short(_tokens_per_param(m)),
                "val loss": loss,
                **_objective_cells(summary, m),
                "train FLOPs": f"{m['train_flops']:.2e}",
                "tok/s": _rate(m["tokens_per_s"]),
            }
        )
    return rows


def _seed_records(summary: dict[str, Any], m: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """A model's per-seed records by seed (a single-run summary: the run itself, at its seed)."""
    if m.get("per_seed"):
        return {int(r["seed"]): r for r in m["per_seed"]}
    seed = int(summary.get("config", {}).get("train", {}).get("seed", 0))
    return {seed: {"seed": seed, **m}}


def per_seed_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: each seed's final validation loss per model and MoE − twin per twin."""
    models = summary["models"]
    by_model = {name: _seed_records(summary, m) for name, m in models.items()}
    seeds = sorted({s for recs in by_model.values() for s in recs})
    twins = [name for name in models if name != "moe"]
    metric = summary.get("metric", "loss")
    other = summary.get("objective", "causal") != "causal" and metric != "loss"
    headers = ["seed", *(f"{name} val loss" for name in models)]
    headers += [f"moe − {t}" for t in twins if "moe" in models]
    headers += [f"{name} {metric.replace('_', ' ')}" for name in models] if other else []
    rows = []
    for s in seeds:
        get = {name: recs.get(s, {}) for name, recs in by_model.items()}
        row = [str(s), *(_fmt(get[name].get("final_val_loss"), ".4f") for name in models)]
        for t in twins if "moe" in models else []:
            a, b = _num(get["moe"].get("final_val_loss")), _num(get[t].get("final_val_loss"))
            row.append("—" if a is None or b is None else f"{a - b:+.4f}")
        if other:
            row += [_fmt(get[name].get("final_metric"), ".4f") for name in models]
        rows.append(row)
    return headers, rows


def label_diff_rows(summary: dict[str, Any], key: str) -> tuple[list[str], list[list[str]]]:
    """``key`` = "by_domain" | "by_lang": per label, MoE − twin with its interval and seeds lower, per twin."""
    diffs = summary.get("differences") or {}
    labels = sorted({lab for d in diffs.values() for lab in d.get(key) or {}})
    headers = [{"by_domain": "domain", "by_lang": "language"}.get(key, "label")]
    for twin in diffs:
        headers += [f"moe − {twin}", "interval", "seeds lower", "p (t)"]
    rows = []
    for lab in labels:
        row = [lab]
        for d in diffs.values():
            c = (d.get(key) or {}).get(lab) or {}
            ti = c.get("t_interval") or {}
            row += [_fmt(c.get("mean")), _interval_text(ti.get("low"), ti.get("high")),
                    f"{int(c.get('n_below') or 0)}/{int(c.get('n') or 0)}", _p_text(c.get("p_t"))]
        rows.append(row)
    return headers, rows


# ---------------------------------------------------------------- outputs


def render_report(summary: dict[str, Any], analysis_html: str = "") -> str:
    """The report page as a string (see :func:`write_report`)."""
    import jinja2

    template = resources.files("moelab.report").joinpath("templates/compare.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _fmt
    env.filters["interval"] = lambda pair: _interval_text(*pair)
    env.filters["p"] = _p_text
    vs = verdicts(summary)
    langs = {lab for d in (summary.get("differences") or {}).values() for lab in d.get("by_lang") or {}}
    return env.from_string(template).render(
        s=summary,
        plots=make_plots(summary),
        rows=table_rows(summary, spread=True),
        seeds=n_seeds(summary),
        verdicts=vs,
        rule=rule_text(summary.get("rule"), comparisons=len(vs)),
        per_seed=per_seed_table(summary),
        by_domain=label_diff_rows(summary, "by_domain"),
        by_lang=label_diff_rows(summary, "by_lang"),
        n_langs=len(langs),
        max_lang_plot=MAX_LANG_PLOT,
        tokens=max(m["tokens"] for m in summary["models"].values()),
        analysis_html=markupsafe.Markup(analysis_html),
    )


def write_report(summary: dict[str, Any], path: str | Path, analysis_html: str = "") -> Path:
    """Render ``templates/compare.html.j2`` with the summary and its plots into ``path``, atomically.

    ``analysis_html`` is the routing-analysis fragment (``moelab.analysis.report.render_sections_html``).
    The page is written to a temporary file beside ``path`` and moved over it, so a reader never
    sees half a report and a failed render leaves the previous one in place.
    """
    html = render_report(summary, analysis_html)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def markdown_table(summary: dict[str, Any]) -> str:
    """The summary table as Markdown (for the README): the terminal's columns, loss as mean ± sd over seeds."""
    rows = table_rows(summary, spread=True)
    n = n_seeds(summary)
    header = [f"val loss (mean ± sd, {n} seeds)" if k == "val loss" and n > 1 else k for k in rows[0]]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(f"`{v}`" if k == "model" else v for k, v in r.items()) + " |" for r in rows]
    return "\n".join(lines)


def print_table(summary: dict[str, Any], console=None) -> None:
    """The end-of-run table (fits 80 columns: headers stack their words) and the verdict sentence(s)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows = table_rows(summary)
    objective, metric = summary.get("objective", "causal"), summary.get("metric", "loss")
    seeds = summary.get("seeds") or []
    tokens = max(m["tokens"] for m in summary["models"].values())
    say = dict(markup=False, highlight=False)
    n = n_seeds(summary)
    console.print(f"moelab compare: {summary['name']} ({tokens:,} training tokens per model)", **say)
    where = f": {', '.join(map(str, seeds))}" if seeds else ""
    console.print(f"objective {objective}, metric {metric.replace('_', ' ')}; {n} seed{'s' if n != 1 else ''}{where}", **say)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in rows[0]:
        table.add_column(col.replace(" ", "\n"), justify="left" if col == "model" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r.values())
    console.print(table)
    if any(_num(m.get("final_val_loss_sd")) is not None for m in summary["models"].values()):
        sds = ", ".join(f"{k} {_fmt(m.get('final_val_loss_sd'), '.4f')}" for k, m in summary["models"].items())
        console.print(f"sd of val loss over seeds: {sds}", **say)
    for v in verdicts(summary):
        console.print(v["sentence"], **say)
        if v["note"]:
            console.print(f"  {v['note']}", **say)

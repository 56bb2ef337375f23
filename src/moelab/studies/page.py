"""A study's page: ``docs/studies/NAME.json`` (every number), ``NAME.md`` (claim, method, the
declared rule, per-arm mean ± sd, the verdict sentence with its interval, the paired differences,
plots, command, wall time) and the ``README.md`` index of every study.

Why one writer: the pages are generated, never hand-edited, so ``moelab study NAME`` and
``moelab study NAME --rescore`` must lay them out identically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moelab.outputs import atomic_write_bytes, atomic_write_text
from moelab.studies.arms import BUDGET_METRICS
from moelab.studies.result import CATALOG, STUDIES, StudyResult
from moelab.studies.scoring import comparisons, descriptive_differences

# metrics drawn, in this order, for a study that returns no figure of its own
BAR_METRICS = (
    "val_loss",
    "drop_rate",
    "drop_first_quarter",
    "drop_last_quarter",
    "max_vio_global",
    "load_cv",
    "dead_experts",
    "tokens_per_s",
)


def write_study(res: StudyResult, docs: Path) -> None:
    """``docs/NAME.json`` and ``docs/NAME.md``, then regenerate ``docs/README.md`` from every JSON there.

    The pages are generated and rewritten by every run by design; each file is replaced in one step
    (:mod:`moelab.outputs`), so a crash leaves the old page or the new one, never half of one."""
    docs.mkdir(parents=True, exist_ok=True)
    res.plots = [_place_plot(p, docs) for p in res.plots]
    if not res.plots:  # a study without its own figure gets bars of its main metrics
        from moelab.studies import plots

        shown = [m for m in BAR_METRICS if any(m in a["mean"] for a in res.arms.values())]
        if shown:
            plots.arm_bars(res.arms, shown, docs / f"{res.name}.png", f"{res.name} (mean ± std over seeds)")
            res.plots = [f"{res.name}.png"]
    atomic_write_text(docs / f"{res.name}.json", json.dumps(res.to_json(), indent=1))
    atomic_write_text(docs / f"{res.name}.md", "\n".join(page_lines(res)))
    write_index(docs)


def page_lines(res: StudyResult) -> list[str]:
    metrics = sorted({m for a in res.arms.values() for m in a["mean"]} - set(BUDGET_METRICS))
    lines = [
        f"# study: {res.name}",
        "",
        f"**Claim.** {res.claim}",
        "",
        f"**Method.** {res.method}",
        "",
        f"Budget `{res.budget}`, seeds {res.seeds}, data: {res.data}.",
        "",
    ]
    if res.rule:
        lines += [
            f"**Rule** (declared in `{_module(res.name)}`): {res.rule.get('description', '')}",
            "",
        ]
    lines += [
        "Mean ± sd over seeds:",
        "",
        "| arm | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for arm, a in res.arms.items():
        cells = [f"{a['mean'][m]:.4g} ± {a['std'][m]:.2g}" if m in a["mean"] else "" for m in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += budget_table(budget_arms(res))
    lines += lr_table(res.numbers.get("lr_tuning"))
    lines += label_tables(res.arms)
    lines += ["", f"**Verdict: {res.verdict}** — {res.verdict_reason}", ""]
    lines += verdict_tables(res.verdict_detail, res.rule, res.arms)
    for n, c in enumerate(res.further_claims, start=2):
        lines += [f"**Claim {n}.** {c['claim']}", ""]
        if c.get("rule"):
            lines += [f"**Rule** (declared in `{_module(res.name)}`): {c['rule'].get('description', '')}", ""]
        lines += [f"**Verdict: {c['verdict']}** — {c['verdict_reason']}", ""]
        lines += verdict_tables(c.get("verdict_detail", {}), c.get("rule", {}), res.arms)
    lines += [f"![{p}]({p})" for p in res.plots]
    lines += ["", "Command:", "", f"    {res.command}", ""]
    if res.wall_s is not None:
        threads = f"{res.threads} torch thread" + ("s" if res.threads != 1 else "")
        if (res.jobs or 1) > 1:
            threads = f"{res.jobs} runs side by side of {threads} each"
        lines += [f"Wall time {res.wall_s / 60:.1f} min with {threads}.", ""]
    if res.rescored:
        r = res.rescored
        lines += [
            f"Verdict re-scored on {r['date']} from the committed per-seed numbers with the rule declared in "
            f"`{_module(res.name)}` (`moelab study {res.name} --rescore`, no training); the rule was written "
            "after these numbers were first measured; the numbers, command and wall time above are the original "
            f"run's. Before: **{r['previous_verdict']}** ({r['previous_reason']}).",
            "",
        ]
    return lines


BUDGET_HEADERS = {
    "steps": "steps",
    "tokens": "tokens a run",
    "params_active": "active params (non-embedding)",
    "params_total": "total params (non-embedding)",
    "tokens_per_active_param": "tokens / active param",
    "train_flops": "training FLOPs",
}


def lr_table(tuning: dict[str, Any] | None) -> list[str]:
    """The learning-rate grid of :func:`moelab.studies.arms.tune_lr`: final validation loss per arm and
    rate on the tuning seed, the chosen rate in bold."""
    if not tuning:
        return []
    rates = sorted({lr for row in tuning["grid"].values() for lr in row}, key=float)
    lines = [
        "",
        f"Learning rate per arm: final validation loss on tuning seed {tuning['seed']} (not one of the verdict's "
        "seeds) at each rate of the grid; the arm then runs every seed at its best (**bold**):",
        "",
        "| arm | " + " | ".join(f"lr {lr}" for lr in rates) + " |",
        "|---" + "|--:" * len(rates) + "|",
    ]
    for arm, row in tuning["grid"].items():
        chosen = f"{tuning['lr'][arm]:g}"
        cells = [(f"**{_num(row[lr])}**" if lr == chosen else _num(row[lr])) if lr in row else "" for lr in rates]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if tuning.get("at_edge"):
        lines += ["", f"Best rate at the edge of the grid (a better one may lie beyond it): {', '.join(tuning['at_edge'])}."]
    return lines


def budget_arms(res: StudyResult) -> dict[str, dict[str, Any]]:
    """The summaries that hold the runs' budget: the arms, or ``numbers["budget_arms"]`` for a study
    whose rows are not its runs."""
    return res.numbers.get("budget_arms") or res.arms


def budget_table(arms: dict[str, dict[str, Any]]) -> list[str]:
    """Each arm's budget (:data:`~moelab.studies.arms.BUDGET_METRICS`, the mean over seeds: the same
    in every seed): how far each run was trained, in steps, tokens and tokens per active parameter."""
    shown = [m for m in BUDGET_HEADERS if any(m in a["mean"] for a in arms.values())]
    if not any(m in shown for m in ("steps", "params_active")):  # a page written before budgets were recorded
        return []
    lines = ["", "Budget of each run:", "", "| arm | " + " | ".join(BUDGET_HEADERS[m] for m in shown) + " |"]
    lines.append("|---" + "|--:" * len(shown) + "|")
    for arm, a in arms.items():
        lines.append(f"| {arm} | " + " | ".join(_num(a["mean"].get(m)) for m in shown) + " |")
    return lines


def effect_figure(detail: dict[str, Any]) -> str:
    """A verdict's effect with its 95% interval in a few characters, for the index: the claimed
    paired difference (a − b), iso-flop's compute multiplier, or sqrt-rule's α."""
    claimed = comparisons(detail)
    if claimed:
        c = claimed[0]["comparison"]
        return f"{c['a']} − {c['b']}: {_num(c['mean'], True, 3)} {_interval(c['t_interval'], 3)}"
    if "per_arm" in detail and "headline" in detail:  # iso-flop
        m = detail["per_arm"].get(detail["headline"], {}).get("multiplier", {})
        if "geometric_mean" in m:
            iv = _interval(m.get("t_interval", {}), 3)
            return f"{detail['headline']}: ×{_num(m['geometric_mean'], digits=3)} {iv} compute"
    if "alpha_per_seed" in detail and "mean" in detail:  # sqrt-rule
        return f"α = {_num(detail['mean'], digits=3)} {_interval(detail.get('interval', {}), 3)}"
    return "n/a"


def budget_figure(arms: dict[str, dict[str, Any]], metric: str) -> str:
    """``metric``'s range over the arms (``lo–hi``, or one value), "n/a" when the page predates it."""
    xs = [a["mean"][metric] for a in arms.values() if math.isfinite(a.get("mean", {}).get(metric, math.nan))]
    if not xs:
        return "n/a"

    def fmt(x: float) -> str:  # whole numbers (steps) in full, others to 3 digits
        return f"{x:.0f}" if x == int(x) and abs(x) < 1e6 else f"{x:.3g}"

    lo, hi = fmt(min(xs)), fmt(max(xs))
    return lo if lo == hi else f"{lo}–{hi}"


def _module(name: str) -> str:
    return f"moelab/studies/{name.replace('-', '_')}.py"


def _num(x: Any, sign: bool = False, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:{'+' if sign else ''}.{digits}g}"


def _p(x: Any) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return "< 0.001" if x < 0.001 else f"{x:.2g}"


def _interval(iv: dict[str, Any], digits: int = 4) -> str:
    if iv.get("low") is None or iv.get("high") is None:
        return "n/a"
    return f"[{_num(iv['low'], digits=digits)}, {_num(iv['high'], digits=digits)}]"


def verdict_tables(detail: dict[str, Any], rule: dict[str, Any], arms: dict[str, dict[str, Any]]) -> list[str]:
    """The paired differences behind a verdict (its ``detail`` under ``rule``; and, for reading only,
    every other arm against the claim's reference arm), or the study's own table (``detail["table"]``)."""
    lines: list[str] = []
    claimed = comparisons(detail)
    if claimed:
        lower = rule.get("lower_is_better", True)
        side = "lower" if lower else "higher"
        level = claimed[0]["comparison"]["t_interval"]["level"]
        lines += [
            f"Paired differences behind the verdict (a − b per seed; {level:.0%} intervals):",
            "",
            f"| a − b | per seed | mean | sd | t interval | bootstrap | seeds {side} | p (t) | p (sign) "
            "| p (sign-flip) | p used |",
            "|---|---|--:|--:|---|---|--:|--:|--:|--:|--:|",
        ]
        for v in claimed:
            c = v["comparison"]
            n_side = c["n_below"] if lower else c["n_above"]
            per_seed = ", ".join(_num(d, sign=True) for d in c["diffs"])
            lines.append(
                f"| {c['a']} − {c['b']} | {per_seed} | {_num(c['mean'], True)} | {_num(c['sd'])} | "
                f"{_interval(c['t_interval'])} | {_interval(c['bootstrap_interval'])} | {n_side}/{c['n']} | "
                f"{_p(c['p_t'])} | {_p(c['p_sign'])} | {_p(c['p_permutation'])} | {_p(v['p_adjusted'])} |"
            )
        lines.append("")
        ref, metric = rule.get("than", [None])[0], rule.get("metric")
        others = descriptive_differences(arms, metric, ref, skip=[c["comparison"]["a"] for c in claimed])
        if others:
            lines += [
                f"Every other arm − {ref} on {metric}, paired by seed (for reading only: no verdict is drawn "
                "from these rows, and they are not corrected for multiple comparisons):",
                "",
                f"| a − b | per seed | mean | 95% t interval | seeds {side} |",
                "|---|---|--:|---|--:|",
            ]
            for c in others:
                n_side = c.n_below if lower else c.n_above
                per_seed = ", ".join(_num(d, sign=True) for d in c.diffs)
                iv = c.t_interval.to_json()
                lines.append(
                    f"| {c.a} − {c.b} | {per_seed} | {_num(c.mean, True)} | {_interval(iv)} | {n_side}/{c.n} |"
                )
            lines.append("")
    table = detail.get("table")
    if table:
        lines += [table.get("title", ""), "", "| " + " | ".join(table["columns"]) + " |"]
        lines.append("|---" * len(table["columns"]) + "|")
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table["rows"]]
        lines.append("")
    return lines


def _place_plot(plot: str, docs: Path) -> str:
    """A plot the study wrote elsewhere (its run folder) is copied beside the page; the page links
    it by file name."""
    src = Path(plot)
    if src.is_absolute() or src.parent != Path("."):
        if src.is_file() and src.resolve() != (docs / src.name).resolve():
            atomic_write_bytes(docs / src.name, src.read_bytes())
        return src.name
    return plot


def label_tables(arms: dict[str, dict[str, Any]], max_cols: int = 12) -> list[str]:
    """One markdown table per label (domain, language): validation loss per value, arms as rows.

    Labels with more than ``max_cols`` values stay in the JSON only (too wide to read)."""
    names = sorted({n for a in arms.values() for n in a.get("by_label", {})})
    lines: list[str] = []
    for name in names:
        values = sorted({v for a in arms.values() for v in a.get("by_label", {}).get(name, {})})
        if not values or len(values) > max_cols:
            continue
        lines += ["", f"Validation loss by {name}:", "", "| arm | " + " | ".join(values) + " |"]
        lines.append("|---" * (len(values) + 1) + "|")
        for arm, a in arms.items():
            cell = a.get("by_label", {}).get(name, {})
            cells = [f"{cell[v]['mean']:.4g} ± {cell[v]['std']:.2g}" if v in cell else "" for v in values]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def write_index(docs: Path) -> None:
    rows = [
        "# Studies",
        "",
        "Generated by `moelab study`; one row per study in the catalog."
        + (
            " Methods, budgets and wall times: [methods.md](methods.md)."
            if (docs / "methods.md").is_file()
            else ""
        ),
        "",
        "Effect: the verdict's paired difference (a − b, the claim's metric) with its 95% interval. Tokens per",
        "active (non-embedding) parameter and steps over the study's arms; n/a: run before they were recorded.",
        "",
        "| study | claim | declared rule | verdict | effect [95% interval] | tokens / active param | steps | seeds | budget |",
        "|---|---|---|---|---|--:|--:|--:|---|",
    ]
    for name, line in CATALOG.items():
        f = docs / f"{name}.json"
        if f.is_file():
            res = StudyResult.from_json(json.loads(f.read_text(encoding="utf-8")))
            runs = budget_arms(res)
            budget = (
                f"{budget_figure(runs, 'tokens_per_active_param')} | {budget_figure(runs, 'steps')} | "
                f"{len(res.seeds)} | {res.budget} |"
            )
            rule = res.rule.get("description", "")
            rows.append(
                f"| [{name}]({name}.md) | {res.claim} | {rule} | {res.verdict} | {effect_figure(res.verdict_detail)} | "
                f"{budget}"
            )
            for n, c in enumerate(res.further_claims, start=2):
                effect = effect_figure(c.get("verdict_detail", {}))
                rule = c.get("rule", {}).get("description", "")
                rows.append(f"| [{name}]({name}.md) (claim {n}) | {c['claim']} | {rule} | {c['verdict']} | {effect} | {budget}")
        else:
            status = "not run" if name in STUDIES else "not implemented"
            rows.append(f"| {name} | {line} | | {status} | | | | | |")
    atomic_write_text(docs / "README.md", "\n".join(rows) + "\n")

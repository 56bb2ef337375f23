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
from moelab.studies.result import CATALOG, STUDIES, StudyResult
from moelab.studies.scoring import comparisons, descriptive_differences

# metrics drawn, in this order, for a study that returns no figure of its own
BAR_METRICS = (
    "val_loss",
    "drop_rate",
    "drop_first_quarter",
    "drop_last_quarter",
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
    metrics = sorted({m for a in res.arms.values() for m in a["mean"]})
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
    lines += label_tables(res.arms)
    lines += ["", f"**Verdict: {res.verdict}** — {res.verdict_reason}", ""]
    lines += verdict_tables(res)
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


def _module(name: str) -> str:
    return f"moelab/studies/{name.replace('-', '_')}.py"


def _num(x: Any, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:{'+' if sign else ''}.4g}"


def _p(x: Any) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return "< 0.001" if x < 0.001 else f"{x:.2g}"


def _interval(iv: dict[str, Any]) -> str:
    if iv.get("low") is None or iv.get("high") is None:
        return "n/a"
    return f"[{_num(iv['low'])}, {_num(iv['high'])}]"


def verdict_tables(res: StudyResult) -> list[str]:
    """The paired differences behind the verdict (and, for reading only, every other arm against
    the claim's reference arm), or the study's own table (``verdict_detail["table"]``)."""
    lines: list[str] = []
    claimed = comparisons(res.verdict_detail)
    if claimed:
        lower = res.rule.get("lower_is_better", True)
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
        ref, metric = res.rule.get("than", [None])[0], res.rule.get("metric")
        others = descriptive_differences(res.arms, metric, ref, skip=[c["comparison"]["a"] for c in claimed])
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
    table = res.verdict_detail.get("table")
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
        "| study | claim | verdict | budget |",
        "|---|---|---|---|",
    ]
    for name, line in CATALOG.items():
        f = docs / f"{name}.json"
        if f.is_file():
            d = json.loads(f.read_text(encoding="utf-8"))
            rows.append(f"| [{name}]({name}.md) | {d['claim']} | {d['verdict']} | {d['budget']} |")
        else:
            status = "not run" if name in STUDIES else "not implemented"
            rows.append(f"| {name} | {line} | {status} | |")
    atomic_write_text(docs / "README.md", "\n".join(rows) + "\n")

"""The analysis report: sections with a reading guide, plots and tables; one self-contained HTML.

``render_sections(analysis, plots)`` turns an analysis.json dict into :class:`Section` objects
(title, one-paragraph reading guide, base64 PNGs, small tables). ``moelab analyze`` renders them
with ``templates/report.html.j2``; ``moelab compare`` can reuse the same sections inside its own
report (``render_sections_html(sections)`` gives the HTML fragment). Every section is present
even when its analysis was not run, with a note saying how to run it, so reports line up.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from moelab.analysis.corrected import corrected_of
from moelab.outputs import atomic_write_text


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Section:
    """One question of the report. ``plots`` are ``(caption, base64 PNG)`` pairs."""

    id: str
    title: str
    guide: str
    plots: list[tuple[str, str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    note: str = ""

    @property
    def ran(self) -> bool:
        return bool(self.plots or self.tables)


GUIDES = {
    "load": (
        "Load balance. The left heatmap shows which share of each layer's routing choices (before "
        "capacity drops) each expert took; a uniform colour is perfect balance (1/E each). CV is the "
        "coefficient of variation of the loads (0 = balanced), entropy the load entropy over log E "
        "(1 = balanced). Dead experts received nothing in the whole pass; the drop rate is the share of "
        "assignments a capacity policy discarded; the top-1 margin is how far a token's best expert is "
        "ahead of the second (small = the router hesitates). The co-activation maps show how often two "
        "experts serve the same token (k ≥ 2), the transition maps where a layer's top-1 tokens go next."
    ),
    "specialization": (
        "Specialisation (OpenMoE's questions: domain, language, position, token). NMI is the normalised "
        "mutual information between a token's top-1 expert and a label; finite samples make it positive "
        "even without any dependence, most for labels with many values (token ids). The shuffled "
        "baseline is the NMI after permuting the labels: between documents for a label that is constant "
        "within each document (domain, language), between tokens otherwise (token id, position). The "
        "corrected NMI is NMI minus the baseline's mean (≈ 0 without dependence), with a 95% interval from "
        "replicates of half the documents, each corrected by its own baseline (a normal interval, centred "
        "on the estimate). The step-0 columns are the same statistic for the untrained router on the same "
        "tokens (a random router already routes by token id), and the gain is trained minus step-0 with a "
        "paired interval: specialisation that training produced. A corrected interval that covers 0 is no "
        "evidence of specialisation. 'uncertainty' is the share of the expert choice's entropy the label "
        "explains. Position is balanced by design (every sequence holds each position once), so its "
        "corrected NMI sits at or slightly below 0 when routing ignores position. OpenMoE found routing "
        "driven by token id more than by domain, and none by position."
    ),
    "experts": (
        "What each expert likes: its share of tokens (top-1), its most frequent tokens, the tokens it "
        "takes far more often than the corpus does (lift), and its most common label values. An expert "
        "whose lift list is one script, one language or one kind of symbol has specialised."
    ),
    "drift": (
        "Routing drift (OpenMoE's early routing learning): for each checkpoint, the share of tokens "
        "whose top-1 expert is already the final checkpoint's. It is 1 at the end by construction; "
        "the dashed line is chance (1/E). A curve near 1 early in training means routing froze early, "
        "before the model could learn semantics to route by."
    ),
    "drops": (
        "Drops towards the end: the drop rate against the position in the capacity group (one "
        "sequence unless stated), at the given capacity factor. With the 'position' policy earlier "
        "tokens take the expert slots first, so when routing is skewed the late tokens are dropped "
        "more (OpenMoE saw this on long multilingual and chat inputs); the 'score' policy drops by "
        "router confidence instead and should give a flat curve. A dropless model is evaluated here "
        "with the capacity imposed at inference."
    ),
    "gradient_conflict": (
        "Gradient conflict: the cosine between the FFN weight gradients of different domains on the "
        "same batches, averaged over domain pairs. Near 1 the domains push the weights the same way, "
        "near 0 they touch different weights or orthogonal directions, below 0 they fight. The seed "
        "claim is that a dense FFN shows more conflict (higher overlap, negative pairs) than MoE "
        "experts, whose gradients separate when domains route apart (whole-layer cosine towards 0); "
        "'within an expert' is the cosine restricted to each expert both domains reach."
    ),
    "sparsity": (
        "Dense FFN activation sparsity: the share of a dense FFN's hidden neurons whose activation "
        "exceeds τ times the token's largest activation, averaged over tokens, against τ. The seed "
        "claim is that only 20–50% of a dense FFN is active per token (shaded band); read the curve "
        "at τ ≈ 0.1."
    ),
}

TITLES = {
    "load": "Load, balance and drops per layer",
    "specialization": "Specialisation: corrected NMI between expert and label",
    "experts": "Per-expert profiles",
    "drift": "Routing drift across checkpoints",
    "drops": "Drops towards the end",
    "gradient_conflict": "Gradient conflict: dense FFN vs experts",
    "sparsity": "Dense FFN activation sparsity",
}

HOW_TO_RUN = {
    "drift": "not run: pass --checkpoints RUN_DIR (or several checkpoint folders)",
    "gradient_conflict": "not run: needs a dense model (pass --dense CKPT) or an MoE model, and a 'domain' label",
    "sparsity": "not run: needs a dense model (pass --dense CKPT, or analyse a dense checkpoint)",
    "drops": "not run: needs an MoE model",
    "load": "not run: needs an MoE model",
    "specialization": "not run: needs an MoE model",
    "experts": "not run: needs an MoE model",
}


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _f(x: float) -> str:
    return f"{x:.3f}"


def _iv(lo: float, hi: float) -> str:
    return f"[{_f(lo)}, {_f(hi)}]"


def _specialization_table(s: dict[str, Any]) -> Table:
    step0 = bool(s.get("step0"))
    headers = ["layer", "label", "null", "NMI", "shuffled baseline", "corrected NMI [95%]"]
    if step0:
        headers += ["step-0 corrected", "gain [95%]"]
    headers.append("uncertainty")
    rows = []
    for la in s["layers"]:
        for name in s["labels"]:
            v = la["by_label"].get(name)
            if not v:
                continue
            row = [la["layer"], name, v.get("unit", "token"), _f(v["nmi"]),
                   f"{_f(v['baseline_mean'])} {_iv(v['baseline_low'], v['baseline_high'])}",
                   f"{_f(corrected_of(v))} {_iv(v['ci_low'], v['ci_high'])}"]
            if step0:
                s0 = v.get("step0")
                row += [f"{_f(s0['corrected'])} {_iv(s0['ci_low'], s0['ci_high'])}" if s0 else "—",
                        f"{_f(v['gain'])} {_iv(v['gain_ci_low'], v['gain_ci_high'])}" if "gain" in v else "—"]
            rows.append([*row, _f(v["uncertainty"])])
    caption = ""
    if step0 and isinstance(s.get("step0_model"), dict):
        caption = f"step-0 model: {s['step0_model'].get('note') or s['step0_model'].get('source')}"
    return Table(headers, rows, caption)


def specialization_lines(analysis: dict[str, Any]) -> list[str]:
    """Plain-text lines for a terminal (``moelab analyze``): per layer and label the corrected NMI with its
    interval, and the step-0 value and gain when present; empty when the specialisation was not run."""
    s = analysis.get("specialization")
    if not s or not s.get("layers"):
        return []
    head = "specialisation: corrected NMI = NMI − shuffled baseline [95% interval]"
    lines = [head + (", step-0 router, gain [95%]" if s.get("step0") else "")]
    for la in s["layers"]:
        for name in s["labels"]:
            v = la["by_label"].get(name)
            if not v:
                continue
            text = f"  layer {la['layer']} {name:<9} {_f(corrected_of(v))} {_iv(v['ci_low'], v['ci_high'])}"
            if v.get("step0"):
                text += f"  step 0 {_f(v['step0']['corrected'])}  gain {_f(v['gain'])} {_iv(v['gain_ci_low'], v['gain_ci_high'])}"
            lines.append(text)
    return lines


def _tables(key: str, a: dict[str, Any]) -> list[Table]:
    if key == "load" and a.get("metrics"):
        rows = [
            [la["layer"], la["tokens"], _f(la["cv"]), _f(la["max_over_mean"]), _f(la["entropy"]),
             ", ".join(map(str, la["dead_experts"])) or "none", _f(la["drop_rate"]), _f(la["top1_margin"])]
            for la in a["metrics"]["layers"]
        ]
        return [Table(["layer", "tokens", "CV", "max/mean", "entropy", "dead", "drop rate", "top-1 margin"], rows)]
    if key == "specialization" and a.get("specialization"):
        return [_specialization_table(a["specialization"])]
    if key == "experts" and a.get("experts"):
        rows = []
        for layer, experts in a["experts"].items():
            for e in experts:
                labels = e.get("labels", {})
                top_label = "; ".join(
                    f"{n}: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:2])
                    for n, d in labels.items()
                )
                rows.append([layer, e["expert"], f"{e['share']:.1%}",
                             " ".join(repr(t) for t, _ in e.get("top_tokens", [])[:6]),
                             " ".join(repr(t) for t, _ in e.get("top_lift", [])[:6]), top_label])
        return [Table(["layer", "expert", "share", "top tokens", "top lift", "labels"], rows)]
    if key == "drops":
        rows = []
        for k in ("drops", "drops_score"):
            d = a.get(k)
            for layer, c in (d or {}).get("layers", {}).items():
                rows.append([d["policy"], d["capacity_factor"], layer, _f(c["first_quarter"]), _f(c["last_quarter"])])
        return [Table(["policy", "capacity factor", "layer", "drop rate, first quarter", "last quarter"], rows)] if rows else []
    if key == "gradient_conflict" and a.get("gradient_conflict"):
        rows = []
        for name, res in a["gradient_conflict"].items():
            for layer, r in res["layers"].items():
                m = r["matrix"]
                neg = sum(1 for i in range(len(m)) for j in range(len(m)) if i != j and m[i][j] < 0)
                rows.append([name, layer, _f(r["mean_offdiag"]), _f(r.get("per_expert_mean_offdiag", float("nan"))),
                             f"{neg // 2} of {len(m) * (len(m) - 1) // 2}"])
        return [Table(["model", "layer", "whole-FFN cosine", "within-expert cosine", "negative pairs"], rows)]
    if key == "sparsity" and a.get("sparsity"):
        s = a["sparsity"]
        main = f"{s['main_threshold']:g}"
        rows = [[layer, r["hidden"], r["tokens"], f"{r['active_fraction'][main]:.1%}"] for layer, r in s["layers"].items()]
        return [Table(["layer", "hidden", "tokens", f"active at τ={main}"], rows)]
    return []


PLOTS_OF = {
    "load": [("load", "loads and balance"), ("coactivation", "co-activation and layer-to-layer transitions")],
    "specialization": [("specialization", "corrected NMI per layer and label, trained and step-0")],
    "experts": [],
    "drift": [("drift", "agreement with the final checkpoint")],
    "drops": [("drops", "position policy"), ("drops_score", "score policy")],
    "gradient_conflict": [("gradient_conflict", "mean cosine between domain gradients")],
    "sparsity": [("sparsity", "active share against threshold")],
}


def render_sections(analysis: dict[str, Any], plots: dict[str, bytes] | None = None) -> list[Section]:
    """Sections of the report for an analysis.json dict; ``plots`` default to :func:`make_plots`."""
    if plots is None:
        from moelab.analysis.plots import make_plots

        plots = make_plots(analysis)
    sections = []
    for key, title in TITLES.items():
        sec = Section(id=key, title=title, guide=GUIDES[key])
        sec.plots = [(cap, _b64(plots[name])) for name, cap in PLOTS_OF[key] if name in plots]
        sec.tables = _tables(key, analysis)
        if not sec.ran:
            sec.note = HOW_TO_RUN.get(key, "not run")
        sections.append(sec)
    return sections


def _env() -> jinja2.Environment:
    loader = jinja2.FunctionLoader(
        lambda name: resources.files("moelab.analysis").joinpath("templates", name).read_text(encoding="utf-8")
    )
    return jinja2.Environment(loader=loader, autoescape=True, trim_blocks=True, lstrip_blocks=True)


def render_sections_html(sections: list[Section]) -> str:
    """The sections as an HTML fragment (for embedding in another report, e.g. ``moelab compare``)."""
    return _env().get_template("sections.html.j2").render(sections=sections)


def render_html(analysis: dict[str, Any], plots: dict[str, bytes] | None = None, title: str = "moelab analysis") -> str:
    """A complete, self-contained report page."""
    sections = render_sections(analysis, plots)
    return _env().get_template("report.html.j2").render(
        title=title, sections=sections, body=render_sections_html(sections), summary=analysis.get("summary", {})
    )


def write_report(out_dir: str | Path, analysis: dict[str, Any], title: str = "moelab analysis") -> tuple[Path, Path]:
    """Write ``analysis.json`` and ``report.html`` into ``out_dir``, each in one step (a temporary
    sibling renamed: a crash never leaves half a file); return both paths.

    Deciding whether ``out_dir`` may be written is the caller's (``moelab analyze`` stages its whole
    folder; ``moelab compare`` writes into the folder it created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "analysis.json"
    atomic_write_text(json_path, json.dumps(analysis, indent=1, ensure_ascii=False))
    html_path = out / "report.html"
    atomic_write_text(html_path, render_html(analysis, title=title))
    return json_path, html_path

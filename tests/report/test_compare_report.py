"""The compare report (issue 22, item 8): the paired difference, its interval, 80-column table.

Summaries are built in code with the fields ``moelab compare`` writes (``Comparison``/``Verdict``
JSON from ``moelab.stats`` written out by hand), for 2 seeds and for 1 seed (no interval).
"""

from __future__ import annotations

import io
import math
import re
import statistics

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer
from rich.console import Console

from moelab.report import compare as report
from moelab.report import compare_plots

DOMAINS = ["arithmetic", "code", "prose"]
LANGS = ["de", "en", "fr"]
T95 = {1: 12.706, 2: 4.303}  # two-sided 95% t quantiles for 1 and 2 degrees of freedom


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _comparison(a: list[float], b: list[float], metric: str = "val_loss") -> dict:
    """What ``Comparison.to_json()`` holds for a paired comparison (intervals None with one pair)."""
    diffs = [x - y for x, y in zip(a, b)]
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = statistics.stdev(diffs) if n > 1 else None
    half = T95[n - 1] * sd / math.sqrt(n) if n > 1 else None
    interval = {"low": None if half is None else mean - half, "high": None if half is None else mean + half,
                "level": 0.95, "method": "t"}
    boot = {**interval, "method": "bootstrap-percentile"}
    return {
        "a": "moe", "b": "twin", "metric": metric, "paired": True, "a_values": a, "b_values": b, "diffs": diffs,
        "mean": mean, "sd": sd, "n": n, "t_interval": interval, "bootstrap_interval": boot,
        "p_t": 0.03 if n > 1 else None, "p_sign": 0.5 if n > 1 else None, "p_permutation": 0.5 if n > 1 else None,
        "n_below": sum(d < 0 for d in diffs), "n_above": sum(d > 0 for d in diffs),
    }


RULE = {"metric": "val_loss", "lower_is_better": True, "min_effect": 0.0, "alpha": 0.05, "paired": True,
        "unit": "nats/token"}


def _history(base: float, steps: int = 4) -> dict:
    return {
        "steps": list(range(1, 2 * steps + 1)),
        "tokens": [1024 * s for s in range(1, 2 * steps + 1)],
        "loss": [base + 2.0 / s for s in range(1, 2 * steps + 1)],
        "eval_steps": [2 * s for s in range(1, steps + 1)],
        "eval_tokens": [2048 * s for s in range(1, steps + 1)],
        "val_loss": [base + 1.0 / s for s in range(1, steps + 1)],
    }


def make_summary(seeds: list[int], twins=("dense_iso_active",), objective: str = "causal", langs=LANGS,
                 ppl: float = 61.23, tok_s: float = 52_341.0) -> dict:
    """A summary.json dict as ``run_compare`` writes it (numbers made up, shapes real)."""
    offset = {"moe": 0.0, "dense_iso_active": 0.03, "dense_iso_total": -0.01}
    metric = {"causal": "loss", "mlm": "masked_accuracy"}[objective]
    models = {}
    for name in ("moe", *twins):
        per_seed = []
        for s in seeds:
            loss = 4.0 + offset[name] + 0.01 * s + (0.004 if name != "moe" and s % 2 else 0.0)
            per_seed.append({
                "seed": s, "final_val_loss": loss, "final_val_ppl": math.exp(loss), "final_metric": 0.4 + 0.01 * s,
                "val_loss_by_domain": {d: loss + 0.1 * i for i, d in enumerate(DOMAINS)},
                "val_loss_by_lang": {lang: loss + 0.05 * i for i, lang in enumerate(langs)},
                "expert_load": {"0": [0.3, 0.2, 0.25, 0.25], "1": [0.1, 0.4, 0.3, 0.2]} if name == "moe" else {},
                "tokens_per_s": tok_s, "wall_s": 10.0, "history": _history(loss),
            })
        losses = [r["final_val_loss"] for r in per_seed]
        mean = sum(losses) / len(losses)
        models[name] = {
            "kind": "moe" if name == "moe" else "dense", "ffn_hidden": 64,
            "params_total": 12_345_678 if name != "dense_iso_active" else 3_456_789, "params_active": 3_456_789,
            "params_embedding": 100_000, "flops_per_token": 2.1e7, "flops_formula": "calc", "tokens": 1_638_400,
            "train_flops": 2.1e7 * 1_638_400, "tokens_per_param": 1_638_400 / 3_456_789,
            "final_val_loss": mean, "final_val_loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
            "final_val_ppl": ppl, "final_metric": 0.41, "final_val_bpb": None,
            "val_loss_by_domain": {d: mean + 0.1 * i for i, d in enumerate(DOMAINS)},
            "val_loss_by_lang": {lang: mean + 0.05 * i for i, lang in enumerate(langs)},
            "expert_load": per_seed[0]["expert_load"], "tokens_per_s": tok_s, "train_time_s": 9.0, "wall_s": 10.0,
            "skipped_steps": 0, "history": _history(mean), "per_seed": per_seed,
        }
    differences, plain = {}, {}
    for twin in twins:
        a = [r["final_val_loss"] for r in models["moe"]["per_seed"]]
        b = [r["final_val_loss"] for r in models[twin]["per_seed"]]
        comp = _comparison(a, b)
        tail = ", no interval" if len(seeds) < 2 else f" [{comp['t_interval']['low']:+.4f}, {comp['t_interval']['high']:+.4f}]"
        verdict = "supported" if len(seeds) > 1 and comp["mean"] < 0 else "inconclusive"
        sentence = f"moe − {twin} = {comp['mean']:+.4f}{tail} nats/token, {comp['n_below']}/{len(seeds)} seeds lower: {verdict}"
        by = {key: {lab: _comparison([r[key][lab] for r in models["moe"]["per_seed"]],
                                     [r[key][lab] for r in models[twin]["per_seed"]]) for lab in models["moe"][key]}
              for key in ("val_loss_by_domain", "val_loss_by_lang")}
        per_seed_curves = [
            [x - y for x, y in zip(ra["history"]["val_loss"], rb["history"]["val_loss"])]
            for ra, rb in zip(models["moe"]["per_seed"], models[twin]["per_seed"])
        ]
        curve_mean = [sum(col) / len(col) for col in zip(*per_seed_curves)]
        spread = [0.01 if len(seeds) > 1 else None for _ in curve_mean]
        differences[twin] = {
            "verdict": {"verdict": verdict, "sentence": sentence, "comparison": comp, "p_adjusted": comp["p_t"],
                        "rule": RULE, "reason": "significant and in the claimed direction"},
            "by_domain": by["val_loss_by_domain"], "by_lang": by["val_loss_by_lang"],
            "curve": {"eval_steps": models["moe"]["history"]["eval_steps"],
                      "moe_flops": [t * 2.1e7 for t in models["moe"]["history"]["eval_tokens"]],
                      "twin_flops": [t * 2.0e7 for t in models["moe"]["history"]["eval_tokens"]],
                      "mean": curve_mean,
                      "low": [None if s is None else m - s for m, s in zip(curve_mean, spread)],
                      "high": [None if s is None else m + s for m, s in zip(curve_mean, spread)],
                      "per_seed": per_seed_curves},
        }
        plain[f"moe_minus_{twin}"] = comp["mean"]
    return {
        "name": "unit", "command": "moelab compare --seeds 2", "config": {"train": {"steps": 8, "seed": 0}},
        "hardware": {"device": "cpu", "torch": "2.x", "threads": 1, "bf16_fast": False},
        "objective": objective, "metric": metric, "architecture": "decoder", "seeds": seeds, "jobs": 2, "threads": 1,
        "data": {"corpus": "builtin", "tokenizer": "bpe", "vocab_size": 512, "documents": 100, "train_tokens": 9000,
                 "val_tokens": 1000, "val_documents": 10, "prepare_s": 1.0},
        "rule": RULE, "models": models, "differences": differences, "verdict": plain, "wall_s": 42.0,
    }


def _terminal(summary: dict) -> str:
    console = Console(width=80, record=True, file=io.StringIO())
    report.print_table(summary, console=console)
    return console.export_text()


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_two_seed_report_leads_with_the_verdict_and_draws_the_difference(tmp_path) -> None:
    summary = make_summary([0, 1])
    path = report.write_report(summary, tmp_path / "report.html", analysis_html="<p id='frag'>routing</p>")
    html = path.read_text(encoding="utf-8")
    sentence = summary["differences"]["dense_iso_active"]["verdict"]["sentence"]
    assert html.index(sentence) < html.index("<h2>Summary")  # the verdict comes first
    assert 'class="verdict v-supported"' in html and "paired t, alpha 0.05" in html
    for heading in ("The paired difference during training", "Per domain: MoE − twin", "Per language: MoE − twin",
                    "Statistics of the final difference", "Per seed", "Expert load per layer"):
        assert f"<h2>{heading}</h2>" in html
    assert html.count("data:image/png;base64,") == 7  # steps, FLOPs, difference, domain, lang, domain loss, load
    assert "<p id='frag'>routing</p>" in html and 'src="http' not in html
    assert f"{summary['models']['moe']['final_val_loss']:.4f}" in html
    # per-seed table: each seed's own MoE − twin difference
    for ra, rb in zip(summary["models"]["moe"]["per_seed"], summary["models"]["dense_iso_active"]["per_seed"]):
        assert f"{ra['final_val_loss'] - rb['final_val_loss']:+.4f}" in html
    # per-domain table: the paired mean with its interval
    code = summary["differences"]["dense_iso_active"]["by_domain"]["code"]
    assert f"[{code['t_interval']['low']:+.4f}, {code['t_interval']['high']:+.4f}]" in html
    assert "tokens per param" in html and "<td>0.47</td>" in html
    assert "± " in html  # sd over seeds beside the mean loss
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left behind


def test_one_seed_summary_renders_and_says_no_interval_exists(tmp_path) -> None:
    summary = make_summary([0])
    assert summary["differences"]["dense_iso_active"]["verdict"]["comparison"]["t_interval"]["low"] is None
    html = report.write_report(summary, tmp_path / "r.html").read_text(encoding="utf-8")
    assert report.NO_INTERVAL in html and "no interval" in html
    assert 'class="verdict v-inconclusive"' in html and 'class="verdict v-supported"' not in html
    text = _terminal(summary)
    assert report.NO_INTERVAL.split(":")[0] in text and "1 seed: 0" in text
    assert "sd of val loss" not in text  # no spread to show with one seed
    # the figures are drawn without a band or whiskers, and their titles say why
    fig = compare_plots.difference_figure(summary)
    assert not any(isinstance(c, PolyCollection) for ax in fig.axes for c in ax.collections)
    assert "one seed: no interval" in fig.axes[0].get_title()
    fig = compare_plots.label_difference_figure(summary, "by_domain", "domain")
    assert "one seed: no interval" in fig.axes[0].get_title()


def test_a_summary_without_differences_still_renders(tmp_path) -> None:
    """Older single-run summaries (no seeds, differences, per_seed, tokens_per_param) keep working."""
    summary = make_summary([0])
    for key in ("differences", "seeds", "rule", "jobs", "threads"):
        summary.pop(key)
    for m in summary["models"].values():
        for key in ("per_seed", "tokens_per_param", "final_val_loss_sd"):
            m.pop(key)
    html = report.write_report(summary, tmp_path / "r.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 4  # steps, FLOPs, domain loss, load
    want = summary["verdict"]["moe_minus_dense_iso_active"]
    assert f"moe − dense_iso_active = {want:+.4f} nats/token (one seed)" in html
    assert "<td>0.47</td>" in html  # tokens per parameter computed from tokens and active params
    assert f"moe − dense_iso_active = {want:+.4f}" in _terminal(summary)


def test_difference_plots_have_bands_whiskers_and_zero_lines() -> None:
    summary = make_summary([0, 1, 2], twins=("dense_iso_active", "dense_iso_total"))
    fig = compare_plots.difference_figure(summary)
    panels = list(fig.axes)
    assert len(panels) == 4  # one row per twin: over steps, over FLOPs
    for ax in panels:
        assert any(isinstance(c, PolyCollection) for c in ax.collections)  # the interval band
        assert any(list(line.get_ydata()) == [0.0, 0.0] for line in ax.get_lines())  # the zero line
    assert panels[1].get_xscale() == "log" and "0.95×" in panels[1].get_xlabel()
    fig = compare_plots.label_difference_figure(summary, "by_domain", "domain")
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2 and all(c.has_xerr for c in bars)  # dots with whiskers, one set per twin
    assert not ax.patches  # no bars from 0
    assert any(list(line.get_xdata()) == [0.0, 0.0] for line in ax.get_lines())  # the zero line
    assert [t.get_text() for t in ax.get_yticklabels()] == DOMAINS
    # whisker extents are the t interval
    code = summary["differences"]["dense_iso_active"]["by_domain"]["code"]
    segs = bars[0].lines[2][0].get_segments()
    (x0, _), (x1, _) = segs[1]
    assert (x0, x1) == pytest.approx((code["t_interval"]["low"], code["t_interval"]["high"]))


def test_expert_load_heatmap_has_colour_bar_and_title() -> None:
    fig = compare_plots.expert_load_figure({"0": [0.5, 0.5], "1": [0.9, 0.1]})
    heat, bar = fig.axes
    assert "share" in bar.get_ylabel() and "colour" in heat.get_title() and "1/E = 0.500" in heat.get_title()


def test_many_languages_get_a_table_not_a_plot(tmp_path) -> None:
    langs = [f"l{i:02d}" for i in range(report.MAX_LANG_PLOT + 1)]
    summary = make_summary([0, 1], langs=langs)
    plots = report.make_plots(summary)
    assert "lang_differences" not in plots and "domain_differences" in plots
    html = report.render_report(summary)
    assert f"{len(langs)} languages" in html and "<td>l12</td>" in html and "<th>language</th>" in html


@pytest.mark.parametrize(
    ("objective", "twins", "ppl", "tok_s"),
    [
        ("causal", ("dense_iso_active",), 61.23, 52_341.0),
        ("causal", ("dense_iso_active", "dense_iso_total"), 12_345.67, 1_234_567.0),  # wide numbers
        ("mlm", ("dense_iso_active", "dense_iso_total"), 61.23, 52_341.0),
    ],
)
def test_terminal_table_fits_80_columns(objective, twins, ppl, tok_s) -> None:
    summary = make_summary([0, 1, 2], twins=twins, objective=objective, ppl=ppl, tok_s=tok_s)
    text = _terminal(summary)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    rows = report.table_rows(summary)
    for r in rows:  # every cell printed whole, on one line with its model
        line = next(line for line in lines if line.startswith(r["model"] + " "))
        cells = line.split()
        for v in r.values():
            assert v in cells, (v, line)
    assert len(rows[0]) == 8 and "tokens per param" in rows[0]
    if objective == "mlm":
        assert "val masked accuracy" in rows[0] and "metric masked accuracy" in text
    flat = _flat(text)
    for twin in twins:  # the verdict sentences follow the table, each number intact
        sentence = summary["differences"][twin]["verdict"]["sentence"]
        assert _flat(sentence) in flat
        for number in re.findall(r"[+−-]?\d+\.\d+", sentence):
            assert number in text.split() or any(number in word for word in text.split())
    assert text.index("moe ") < text.index("moe − dense_iso_active =")


def test_markdown_table_has_mean_and_sd() -> None:
    summary = make_summary([0, 1])
    md = report.markdown_table(summary).splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header[4] == "val loss (mean ± sd, 2 seeds)" and len(header) == len(report.table_rows(summary)[0])
    moe = summary["models"]["moe"]
    assert f"{moe['final_val_loss']:.4f} ± {moe['final_val_loss_sd']:.4f}" in md[2]
    assert "±" not in report.markdown_table(make_summary([0]))


def test_write_is_atomic(tmp_path, monkeypatch) -> None:
    """A render that fails leaves the previous report whole and no temporary file behind."""
    path = tmp_path / "report.html"
    path.write_text("previous report", encoding="utf-8")

    def broken(summary):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "make_plots", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        report.write_report(make_summary([0, 1]), path)
    assert path.read_text(encoding="utf-8") == "previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    monkeypatch.setattr(report, "make_plots", lambda summary: {"loss_vs_steps": "x", "loss_vs_flops": "y"})
    monkeypatch.setattr(report.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        report.write_report(make_summary([0, 1]), path)
    assert path.read_text(encoding="utf-8") == "previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # the temporary file was removed


def test_per_seed_table_pairs_seeds_and_keeps_the_objective_metric() -> None:
    summary = make_summary([0, 1], twins=("dense_iso_active", "dense_iso_total"), objective="mlm")
    headers, rows = report.per_seed_table(summary)
    assert headers == ["seed", "moe val loss", "dense_iso_active val loss", "dense_iso_total val loss",
                       "moe − dense_iso_active", "moe − dense_iso_total", "moe masked accuracy",
                       "dense_iso_active masked accuracy", "dense_iso_total masked accuracy"]
    assert [r[0] for r in rows] == ["0", "1"]
    seed1 = {name: m["per_seed"][1]["final_val_loss"] for name, m in summary["models"].items()}
    assert rows[1][4] == f"{seed1['moe'] - seed1['dense_iso_active']:+.4f}"
    assert rows[1][6] == "0.4100"  # seed 1's own metric, not the mean


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_report_reads_what_moelab_stats_writes(tmp_path, seeds) -> None:
    """The fixture's hand-written JSON swapped for ``moelab.stats``' own, NaN (not None) in memory as compare has it."""
    from moelab.stats import Rule, decide, paired_difference

    summary = make_summary(seeds)
    moe, twin = summary["models"]["moe"], summary["models"]["dense_iso_active"]
    a, b = [r["final_val_loss"] for r in moe["per_seed"]], [r["final_val_loss"] for r in twin["per_seed"]]
    verdict = decide(Rule(), a, b, "moe", "dense_iso_active", n_boot=200).to_json()
    d = summary["differences"]["dense_iso_active"]
    d["verdict"], summary["rule"] = verdict, verdict["rule"]
    d["by_domain"] = {
        dom: paired_difference([r["val_loss_by_domain"][dom] for r in moe["per_seed"]],
                               [r["val_loss_by_domain"][dom] for r in twin["per_seed"]], "moe", "dense_iso_active",
                               n_boot=200).to_json()
        for dom in DOMAINS
    }
    if len(seeds) == 1:
        d["curve"]["low"] = d["curve"]["high"] = [math.nan] * len(d["curve"]["mean"])
        moe["final_val_loss_sd"] = twin["final_val_loss_sd"] = math.nan
    html = report.write_report(summary, tmp_path / "r.html").read_text(encoding="utf-8")
    assert verdict["sentence"] in html and f'class="verdict v-{verdict["verdict"].replace(" ", "-")}"' in html
    assert verdict["rule"]["description"] in html
    assert (report.NO_INTERVAL in html) == (len(seeds) == 1)
    text = _terminal(summary)
    assert _flat(verdict["sentence"]) in _flat(text) and max(map(len, text.splitlines())) <= 80

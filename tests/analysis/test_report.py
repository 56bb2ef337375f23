"""`moelab analyze` end to end: analysis.json holds every number, report.html every section with
its plot, self-contained; it opens in headless Chromium without console errors (skipped when
Chromium is absent)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cases import small_config, synthetic_data, train

from moelab.analysis import render_sections
from moelab.analysis.report import TITLES, render_sections_html, specialization_lines
from moelab.checkpoint.folder import checkpoint_name
from moelab.checkpoint.state import save_checkpoint
from moelab.cli import main
from moelab.config import DataConfig, MoEConfig, RunConfig
from moelab.data.corpus import write_jsonl_gz
from moelab.data.synthetic import synthetic_documents
from moelab.model.transformer import Transformer


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    data, tok = synthetic_data(4)
    cfg = small_config(MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    run = RunConfig(model=cfg, data=DataConfig(corpus="synthetic", tokenizer="bytes", seq_len=32))
    model = Transformer(cfg)
    for step in (0, 5):
        if step:
            train(model, data, 5)
        save_checkpoint(tmp / "run" / "checkpoints" / checkpoint_name(step), model, run, tok, train_state={"step": step})
    dense_cfg = replace(cfg, moe=None)
    dense = train(Transformer(dense_cfg), data, 3)
    save_checkpoint(tmp / "dense", dense, replace(run, model=dense_cfg), tok, train_state={"step": 3})
    write_jsonl_gz(synthetic_documents(8, seed=2), tmp / "corpus.jsonl.gz")  # a labelled corpus file
    out = tmp / "out"
    rc = main([
        "analyze", str(tmp / "run"), "--data", str(tmp / "corpus.jsonl.gz"), "--out", str(out), "--checkpoints",
        str(tmp / "run"), "--dense", str(tmp / "dense"), "--max-tokens", "1024", "--drop-tokens", "512", "--no-progress",
    ])
    assert rc == 0
    return out


def test_dense_checkpoint_gets_dense_sections(analysed, tmp_path):
    rc = main(["analyze", str(analysed.parent / "dense"), "--data", str(analysed.parent / "corpus.jsonl.gz"),
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    a = json.loads((tmp_path / "analysis.json").read_text())
    assert "metrics" not in a and set(a["gradient_conflict"]) == {"dense"} and a["sparsity"]["layers"]
    html = (tmp_path / "report.html").read_text()
    assert "not run: needs an MoE model" in html and "data:image/png;base64," in html


def test_analysis_json_has_every_number(analysed):
    a = json.loads((analysed / "analysis.json").read_text())
    assert {"metrics", "specialization", "experts", "drops", "drops_score", "drift", "gradient_conflict", "sparsity"} <= set(a)
    layers = a["metrics"]["layers"]
    assert [la["layer"] for la in layers] == [0, 1]
    for la in layers:
        assert sum(la["load"]) == la["assignments"] == 2 * la["tokens"]
        assert sum(la["load_fraction"]) == pytest.approx(1.0)
    spec = a["specialization"]
    assert set(spec["labels"]) >= {"domain", "lang", "position", "token"}
    # the step-0 router, rebuilt from the checkpoint's run config, beside the trained one
    assert spec["step0"] is True and spec["step0_model"]["source"] == "run config" and spec["step0_model"]["seed"] == 0
    assert spec["units"]["domain"] == "document" and spec["units"]["token"] == "token"
    for v in spec["layers"][0]["by_label"].values():
        assert v["ci_low"] <= v["corrected"] <= v["ci_high"]
        assert v["gain"] == pytest.approx(v["corrected"] - v["step0"]["corrected"])
    assert a["summary"]["step-0 model"].startswith("the run's own initial weights")
    assert a["drift"]["steps"] == [0, 5] and all(v[-1] == 1.0 for v in a["drift"]["layers"].values())
    assert a["drops"]["policy"] == "position" and a["drops_score"]["policy"] == "score"
    assert set(a["gradient_conflict"]) == {"moe", "dense"}
    assert set(a["sparsity"]["layers"]) == {"0", "1"}
    assert len(a["experts"]["0"]) == 4


def test_report_has_every_section_with_its_plot(analysed):
    html = (analysed / "report.html").read_text()
    for sid in TITLES:
        assert f'id="{sid}"' in html
    sections = re.split(r'<section class="moelab-section"', html)[1:]
    assert len(sections) == len(TITLES)
    for sid, body in zip(TITLES, sections):
        if sid != "experts":  # a table, no plot
            assert "data:image/png;base64," in body, sid
        assert 'class="note"' not in body, sid
    assert not re.search(r'(src|href)="(http|//|file:)', html)  # self-contained


def test_sections_reusable_and_missing_ones_explained(analysed):
    a = json.loads((analysed / "analysis.json").read_text())
    del a["drift"]
    sections = render_sections(a)
    by_id = {s.id: s for s in sections}
    assert not by_id["drift"].ran and "--checkpoints" in by_id["drift"].note
    assert by_id["specialization"].plots and by_id["specialization"].tables[0].rows
    fragment = render_sections_html(sections)
    assert "<html" not in fragment and 'id="load"' in fragment


def test_every_heatmap_has_a_colour_bar_and_a_title(analysed, monkeypatch):
    import matplotlib.pyplot as plt

    from moelab.analysis import plots

    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"png")
    a = json.loads((analysed / "analysis.json").read_text())
    names = plots.make_plots(a)
    assert {"load", "coactivation", "specialization"} <= set(names)
    images = [im for fig in figures for ax in fig.axes for im in ax.images]
    assert len(images) >= 1 + 2 + 1  # load, co-activation per layer (2), one transition
    for im in images:
        assert im.colorbar is not None and im.colorbar.ax.get_ylabel(), "heatmap without a labelled colour bar"
        assert "colour" in im.axes.get_title(), im.axes.get_title()
    spec_ax = figures[list(names).index("specialization")].axes[0]
    assert "corrected NMI" in spec_ax.get_ylabel()
    plt.close("all")


def test_specialization_table_shows_corrected_and_step0(analysed):
    a = json.loads((analysed / "analysis.json").read_text())
    table = {s.id: s for s in render_sections(a)}["specialization"].tables[0]
    assert table.headers[:6] == ["layer", "label", "null", "NMI", "shuffled baseline", "corrected NMI [95%]"]
    assert {"step-0 corrected", "gain [95%]"} <= set(table.headers)
    assert table.caption.startswith("step-0 model: the run's own initial weights")
    v = a["specialization"]["layers"][0]["by_label"][table.rows[0][1]]
    assert table.rows[0][5].startswith(f"{v['corrected']:.3f} [")
    lines = specialization_lines(a)
    assert len(lines) == 1 + len(table.rows) and "gain" in lines[0] and f"{v['gain']:.3f}" in lines[1]
    del a["specialization"]["layers"][0]["by_label"][table.rows[0][1]]["corrected"]  # an analysis from before
    assert render_sections(a)


def test_analyze_errors_are_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing"), "--data", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "headless_shell") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_opens_in_headless_chromium(analysed, tmp_path):
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", Path(analysed / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line or "Failed to load" in line]
    assert not console, console
    for sid in TITLES:
        assert f'id="{sid}"' in proc.stdout

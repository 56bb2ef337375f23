"""`moelab compare` over seeds: paired verdict with its interval; the analysis sees only validation documents."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from moelab.calc import arch_from_config, flops_per_token
from moelab.cli import main
from moelab.config import ModelConfig, from_dict, run_preset
from moelab.data.corpus import load_corpus
from moelab.data.loader import split_documents
from moelab.errors import UserError
from moelab.experiment import compare as compare_mod
from moelab.stats import t_interval


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))


def test_compare_smoke_two_seeds_gives_the_paired_difference_with_its_interval(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--preset", "smoke", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["rule"]["metric"] == "val_loss"
    moe, twin = summary["models"]["moe"], summary["models"]["dense_iso_active"]
    assert [s["seed"] for s in moe["per_seed"]] == [0, 1] and len(twin["per_seed"]) == 2
    assert moe["per_seed"][0]["final_val_loss"] != moe["per_seed"][1]["final_val_loss"]  # seeds differ
    diffs = [a["final_val_loss"] - b["final_val_loss"] for a, b in zip(moe["per_seed"], twin["per_seed"])]
    d = summary["differences"]["dense_iso_active"]
    comparison = d["verdict"]["comparison"]
    assert comparison["diffs"] == pytest.approx(diffs) and comparison["paired"]
    ci = t_interval(diffs)
    assert (comparison["t_interval"]["low"], comparison["t_interval"]["high"]) == pytest.approx((ci.low, ci.high))
    assert d["verdict"]["verdict"] in ("supported", "not supported", "inconclusive")
    assert d["verdict"]["sentence"].startswith("moe − dense_iso_active = ")
    assert " ".join(d["verdict"]["sentence"].split()[:3]) in " ".join(printed.split())  # printed as well
    assert set(d["by_domain"]) == set(moe["val_loss_by_domain"]) and "code" in d["by_domain"]
    curve = d["curve"]
    assert len(curve["mean"]) == len(moe["history"]["eval_steps"]) and len(curve["per_seed"]) == 2
    assert curve["mean"][-1] == pytest.approx(comparison["mean"])
    assert moe["tokens_per_param"] == pytest.approx(moe["tokens"] / moe["params_active"])
    html = (out / "report.html").read_text()
    assert d["verdict"]["sentence"] in html or d["verdict"]["sentence"].replace("−", "&minus;") in html
    assert math.isfinite(summary["wall_s"]) and summary["jobs"] >= 1
    analysis = summary["analysis"]
    assert analysis["data"]["split"] == "validation" and analysis["data"]["documents"] == summary["data"]["val_documents"]
    over = analysis["specialization_over_seeds"]
    assert "token" in over and all(len(cell["corrected"]) == 2 for cell in over["token"].values())
    # every model: same budget, learned something, FLOPs from calc's formula, labels per domain
    models = summary["models"]
    assert set(models) == {"moe", "dense_iso_active"}
    for m in models.values():
        assert math.isfinite(m["final_val_loss"]) and m["final_val_loss"] > 0
        assert m["tokens"] == models["moe"]["tokens"] > 0  # same token budget
        h = m["history"]
        assert h["val_loss"][-1] < h["val_loss"][0] or h["loss"][-1] < h["loss"][0]
        assert h["loss"][-1] < math.log(summary["data"]["vocab_size"])  # learned something beyond uniform
        assert m["tokens_per_s"] > 0 and m["train_flops"] > 0
        assert m["flops_formula"] == "calc"  # the formula studies and `moelab calc` use
        assert set(m["val_loss_by_domain"]) >= {"code", "prose", "arithmetic"}
        assert m["final_val_bpb"] > 0 and all(s["final_val_bpb"] > 0 for s in m["per_seed"])
    assert models["moe"]["params_total"] > models["dense_iso_active"]["params_total"]
    assert models["moe"]["params_active"] - models["dense_iso_active"]["params_active"] < 1000  # router only
    assert len(models["moe"]["expert_load"]) == 2 and not models["dense_iso_active"]["expert_load"]
    moe_cfg = replace(from_dict(ModelConfig, summary["config"]["model"]), vocab_size=summary["data"]["vocab_size"])
    want = flops_per_token(arch_from_config(moe_cfg), summary["config"]["data"]["seq_len"])["training"]
    assert models["moe"]["train_flops"] == pytest.approx(want * models["moe"]["tokens"])
    assert summary["verdict"]["moe_minus_dense_iso_active"] == pytest.approx(
        models["moe"]["final_val_loss"] - models["dense_iso_active"]["final_val_loss"]
    )
    assert html.count("data:image/png;base64,") >= 4 + 3  # compare's plots + analysis plots, embedded
    assert "Routing analysis of the MoE" in html and "analysis/report.html" in html
    on_disk = json.loads((out / "analysis" / "analysis.json").read_text())
    assert set(on_disk["specialization"]) == set(analysis["specialization"])
    assert (out / "analysis" / "report.html").is_file()
    assert 'src="http' not in html and f"{moe['final_val_loss']:.4f}" in html
    assert (out / "moe" / "seed1" / "metrics.jsonl").is_file()  # one run folder per model and seed


def test_compare_analysis_traces_only_validation_documents(tmp_path, monkeypatch) -> None:
    """The routing analysis runs in memory on the run's own validation split: no training document."""
    import moelab.analysis.pipeline as pipeline

    seen: dict[str, list[str]] = {}
    real_moe, real_dense = pipeline.analyze_moe, pipeline.analyze_dense

    def spy_moe(model, tokenizer, data, opts, out, **kwargs):
        seen.setdefault("moe", []).extend(data.doc_names)
        return real_moe(model, tokenizer, data, opts, out, **kwargs)

    def spy_dense(model, data, opts):
        seen.setdefault("dense", []).extend(data.doc_names)
        return real_dense(model, data, opts)

    monkeypatch.setattr(pipeline, "analyze_moe", spy_moe)
    monkeypatch.setattr(pipeline, "analyze_dense", spy_dense)
    cfg = run_preset("smoke")
    cfg = replace(cfg, data=replace(cfg.data, corpus="synthetic", synthetic_docs=12),
                  train=replace(cfg.train, steps=4, eval_every=2, progress=False))  # fmt: skip
    compare_mod.run_compare(cfg, tmp_path / "c", seeds=1, jobs=1)
    train_docs, val_docs = split_documents(load_corpus(cfg.data), cfg.data.val_fraction, cfg.data.seed)
    val_ids, train_ids = {d.id for d in val_docs}, {d.id for d in train_docs}
    for role in ("moe", "dense"):
        assert seen[role] and set(seen[role]) == val_ids, role
        assert not set(seen[role]) & train_ids, role


def test_compare_never_overwrites_an_earlier_compare(tmp_path) -> None:
    cfg = run_preset("smoke")
    (tmp_path / "c" / "moe").mkdir(parents=True)
    (tmp_path / "c" / "moe" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="never overwrites"):
        compare_mod.run_compare(cfg, tmp_path / "c", seeds=1)
    assert (tmp_path / "c" / "moe" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--jobs", "0"]])
def test_compare_refuses_bad_seed_and_job_counts(argv, capsys) -> None:
    assert main(["compare", "--preset", "smoke", *argv]) == 2
    assert "must be >= 1" in capsys.readouterr().err

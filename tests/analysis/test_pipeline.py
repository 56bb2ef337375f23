"""The pipeline on models held in memory (what `moelab compare` calls): no checkpoint or corpus is read,
only the split it is given is traced, the step-0 model sits beside the trained one, and the MoE and
dense parts merge into one analysis.json."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from cases import small_config, synthetic_data

from moelab.analysis.pipeline import AnalyzeOptions, analyze_dense, analyze_model, analyze_moe, merge_analyses
from moelab.analysis.trace import Trace
from moelab.config import MoEConfig
from moelab.model.transformer import Transformer

OPTS = dict(max_tokens=1024, drop_tokens=256, conflict_batches=1, n_shuffle=5, n_boot=5, batch_size=4)


@pytest.fixture(autouse=True)
def _no_files(monkeypatch):
    """Reading a corpus or a checkpoint is an error here."""
    import moelab.checkpoint.folder
    import moelab.convert.load
    import moelab.data.corpus

    def refuse(*a, **k):
        raise AssertionError("the in-memory pipeline read from disk")

    for mod, name in ((moelab.data.corpus, "load_corpus"), (moelab.convert.load, "load_model"),
                      (moelab.checkpoint.folder, "resolve_checkpoint")):
        monkeypatch.setattr(mod, name, refuse)


def _models():
    cfg = small_config(MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    torch.manual_seed(1)
    initial = Transformer(cfg).eval()
    trained = Transformer(cfg).eval()
    trained.load_state_dict(initial.state_dict())
    with torch.no_grad():  # a "trained" router: different from step 0
        for layer in trained.moe_layers:
            for p in layer.router.parameters():
                p.add_(torch.randn_like(p))
    dense = Transformer(replace(cfg, moe=None)).eval()
    return trained, initial, dense


def test_analyze_model_in_memory_writes_everything(tmp_path):
    data, tok = synthetic_data(6)
    val = data.subset(list(range(0, data.num_blocks, 2)))  # a "validation split": half of the blocks
    trained, initial, dense = _models()
    opts = AnalyzeOptions(out=str(tmp_path / "a"), **OPTS)
    info = {"source": "run config", "seed": 1, "note": "test"}
    a = analyze_model(trained, tok, val, opts, dense_model=dense, initial_model=initial, step0_info=info,
                      summary={"data": "validation split"})
    assert {"summary", "specialization", "metrics", "experts", "drops", "drops_score", "gradient_conflict", "sparsity"} <= set(a)
    assert set(a["gradient_conflict"]) == {"moe", "dense"}
    assert a["summary"]["data"] == "validation split" and a["summary"]["model"] == "MoE"
    assert a["summary"]["documents in corpus"] == len(torch.unique(val.doc_N))
    traced = np.unique(Trace.load(tmp_path / "a" / "trace").array("doc"))
    assert set(traced.tolist()) <= set(val.doc_N.tolist())  # only the split it was given
    assert a["summary"]["documents traced"] == len(traced)
    s = a["specialization"]
    assert s["step0"] is True and s["step0_model"] == info
    dom = s["layers"][0]["by_label"]["domain"]
    assert dom["unit"] == "document" and dom["gain"] == pytest.approx(dom["corrected"] - dom["step0"]["corrected"])
    # the step-0 numbers are the untrained model's routing of the same tokens
    t0 = Trace.load(tmp_path / "a" / "trace_step0")
    assert np.array_equal(t0.array("token"), Trace.load(tmp_path / "a" / "trace").array("token"))
    assert not np.array_equal(t0.layer(0)["top1"], Trace.load(tmp_path / "a" / "trace").layer(0)["top1"])
    on_disk = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert on_disk["specialization"]["layers"][0]["by_label"]["token"]["step0"]["nmi"] == \
        s["layers"][0]["by_label"]["token"]["step0"]["nmi"]
    assert "step-0 corrected" in (tmp_path / "a" / "report.html").read_text()


def test_specialization_only_and_parts(tmp_path):
    data, tok = synthetic_data(4)
    trained, initial, dense = _models()
    opts = AnalyzeOptions(out=str(tmp_path / "s"), specialization_only=True, **OPTS)
    part = analyze_moe(trained, tok, data, opts, initial_model=initial)
    assert set(part) == {"summary", "specialization"}
    assert part["specialization"]["step0_model"] == {"source": "given by the caller"}
    d = analyze_dense(dense, data, AnalyzeOptions(**OPTS))
    assert set(d) == {"gradient_conflict", "sparsity"} and set(d["gradient_conflict"]) == {"dense"}
    merged = merge_analyses({"summary": {"a": 1}, "gradient_conflict": {"moe": 1}}, {"summary": {"b": 2}, **d})
    assert merged["summary"] == {"a": 1, "b": 2} and set(merged["gradient_conflict"]) == {"moe", "dense"}
    assert merged["sparsity"] is d["sparsity"]
    # the traces analyze_moe left in s/ are an earlier analysis: replaced only when asked
    only = analyze_model(trained, tok, data, replace(opts, overwrite=True), dense_model=dense)  # no step-0 entries
    assert "gradient_conflict" not in only and only["specialization"]["step0"] is False
    with pytest.raises(Exception, match="needs an MoE model"):
        analyze_moe(dense, tok, data, opts)


def test_what_does_not_fit_is_skipped_with_its_reason(tmp_path, monkeypatch):
    """A released model at full size: per-domain gradients (one FFN-sized copy per domain) and a second
    step-0 model do not fit beside it; the analysis runs the rest and says what it skipped and why."""
    from moelab.hardware import AvailableMemory

    data, tok = synthetic_data(6)
    trained, _, dense = _models()
    monkeypatch.setattr("moelab.hardware.available_memory", lambda device="cpu": AvailableMemory(1000, "test"))
    skipped = {"source": "skipped", "seed": None, "note": "step-0 model skipped: too large"}
    a = analyze_model(trained, tok, data, AnalyzeOptions(out=str(tmp_path / "a"), **OPTS), dense_model=dense,
                      step0_info=skipped)  # fmt: skip
    assert "gradient_conflict" not in a and "sparsity" in a and "drops" in a
    assert a["summary"]["gradient conflict"].startswith("skipped: ") and "GiB free (test)" in a["summary"]["gradient conflict"]
    assert a["summary"]["dense gradient conflict"].startswith("skipped: ")
    assert a["specialization"]["step0_model"] == skipped and a["specialization"]["step0"] is False
    assert "skipped" in (tmp_path / "a" / "report.html").read_text()

"""Study ``hybrid-inference``: the calc predictions for the published models, and the study at
--budget smoke (every arm measured, finite positive numbers, a computed verdict)."""

from __future__ import annotations

import json
import math

import pytest

import moelab.studies.hybrid_inference as hybrid  # registers the study
from moelab.errors import UserError
from moelab.studies.base import VERDICTS, run_study

from helpers import all_finite


def test_predictions_for_the_published_models():
    pred = hybrid.predictions()
    models = pred["models"]
    assert set(models) == {"qwen3-235b-a22b", "llama-3-70b"}
    for m in models.values():
        assert m["predicted_tok_s"] > 0 and m["published_tok_s"] > 0
        assert m["gpu_resident_bytes"] <= hybrid.HARDWARE.gpu_memory_gb * 1e9
    # Neither fits in 24 GB at 4.5 bits; the MoE leaves room for a fraction of its experts.
    assert 0 < models["qwen3-235b-a22b"]["expert_fraction_on_gpu"] < 1
    assert models["llama-3-70b"]["cpu_bytes"] > 0
    assert pred["published_ratio"] == pytest.approx(3.0 / 1.7)
    ratio = models["qwen3-235b-a22b"]["predicted_tok_s"] / models["llama-3-70b"]["predicted_tok_s"]
    assert pred["predicted_ratio"] == pytest.approx(ratio)
    assert pred["ratio_relative_error"] == pytest.approx(ratio / (3.0 / 1.7) - 1)


def test_unknown_budget_is_a_user_error():
    with pytest.raises(UserError, match="unknown budget"):
        hybrid.budget_spec("huge")


def test_hybrid_inference_smoke(tmp_path):
    run_study("hybrid-inference", "smoke", 3, out=tmp_path / "runs", docs=tmp_path / "docs", jobs=2)
    d = json.loads((tmp_path / "docs" / "hybrid-inference.json").read_text())
    assert (d["jobs"], d["threads"]) == (1, 1)  # timed alone on the smoke budget's thread, whatever --jobs said
    assert d["budget"] == "smoke" and d["seeds"] == [0, 1, 2]
    assert d["verdict"] in VERDICTS and d["verdict_reason"]
    assert set(d["arms"]) == set(hybrid.ARMS)
    assert all_finite(d["arms"]) and all_finite(d["numbers"])
    for name, arm in d["arms"].items():
        assert len(arm["per_seed"]["decode_tok_s"]) == 3
        assert arm["mean"]["decode_tok_s"] > 0 and arm["mean"]["predicted_tok_s"] > 0
        if name in hybrid.OFFLOADED:
            assert 0.0 <= arm["mean"]["hit_rate"] <= 1.0 and arm["mean"]["bytes_moved_per_token"] >= 0
            assert arm["mean"]["tier_bandwidth_gbs"] > 0  # measured per tier, not assumed
        ratio = [m / p - 1 for m, p in zip(arm["per_seed"]["decode_tok_s"], arm["per_seed"]["predicted_tok_s"])]
        assert arm["per_seed"]["prediction_error"] == pytest.approx(ratio)
    n = d["numbers"]
    assert n["measured_bandwidth_gbs"] > 0
    pred = n["prediction"]
    for m in pred["models"].values():
        assert m["predicted_tok_s"] > 0 and m["published_tok_s"] > 0
    assert pred["predicted_ratio"] > 0 and math.isfinite(pred["ratio_relative_error"])
    assert n["models"]["moe"]["params_total"] == pytest.approx(
        n["models"]["dense_equal_total"]["params_total"], rel=0.01
    )
    assert (
        n["models"]["moe"]["read_bytes_per_token"] < n["models"]["dense_equal_total"]["read_bytes_per_token"]
    )
    assert set(n["ratio_tok_s_over_dense"]) == set(hybrid.ARMS[1:])
    assert d["data"].startswith("random weights")
    assert (tmp_path / "docs" / "hybrid-inference.png").is_file()
    assert "Verdict:" in (tmp_path / "docs" / "hybrid-inference.md").read_text()

"""Specialisation: NMI against the written-out formula; routing forced by domain gives NMI 1 and a
corrected NMI far above its document-level null, random routing stays inside the shuffled-label baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cases import BatchesWithDomain, DomainLookup, force_routing, random_experts, small_config, synthetic_data

from moelab.analysis import collect
from moelab.analysis.specialization import (
    expert_profiles,
    mutual_information,
    nmi,
    position_buckets,
    specialization,
)
from moelab.config import MoEConfig
from moelab.data.loader import eval_batches
from moelab.model.transformer import Transformer


def nmi_by_hand(x, y):
    """2 I(X;Y) / (H(X) + H(Y)) from the definition, with Python loops over the joint table."""
    n = len(x)
    pxy, px, py = {}, {}, {}
    for a, b in zip(x.tolist(), y.tolist()):
        pxy[a, b] = pxy.get((a, b), 0) + 1 / n
        px[a] = px.get(a, 0) + 1 / n
        py[b] = py.get(b, 0) + 1 / n
    i = sum(p * math.log(p / (px[a] * py[b])) for (a, b), p in pxy.items())
    hx = -sum(p * math.log(p) for p in px.values())
    hy = -sum(p * math.log(p) for p in py.values())
    return 2 * i / (hx + hy)


def test_nmi_matches_definition():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 500)
    y = (x + rng.integers(0, 3, 500)) % 7
    assert nmi(x, y) == pytest.approx(nmi_by_hand(x, y), rel=1e-9)
    assert nmi(x, x * 3 + 1) == pytest.approx(1.0)  # a relabelling carries all information
    assert nmi(x, np.zeros_like(x)) == 0.0
    w = rng.integers(0, 3, 500).astype(float)  # integer weights = repeating samples
    rep = np.repeat(np.arange(500), w.astype(int))
    assert nmi(x, y, weights_N=w) == pytest.approx(nmi_by_hand(x[rep], y[rep]), rel=1e-9)
    i, hx, hy = mutual_information(x, y)
    assert i <= min(hx, hy) + 1e-12


def test_position_buckets():
    assert position_buckets(np.array([0, 3, 4, 31]), 32, 8).tolist() == [0, 0, 1, 7]


def _routed_trace(tmp_path, expert_fn_for, name):
    data, _ = synthetic_data(6)
    lookup = DomainLookup(8)
    model = Transformer(small_config(MoEConfig(num_experts=8, top_k=1, expert_hidden=16))).eval()
    force_routing(model, expert_fn_for(lookup))
    batches = BatchesWithDomain(eval_batches(data, 8, 10), lookup)
    return collect(model, batches, tmp_path / name, label_names=data.label_names)


def test_routing_forced_by_domain_gives_nmi_one(tmp_path):
    trace = _routed_trace(tmp_path, lambda lookup: lookup, "domain")
    s = specialization(trace, n_shuffle=10, n_boot=10)
    for layer in s["layers"]:
        dom = layer["by_label"]["domain"]
        assert dom["nmi"] == pytest.approx(1.0, abs=1e-9)
        assert dom["uncertainty"] == pytest.approx(1.0, abs=1e-9)
        # 30 documents: shuffling domains between documents leaves a large chance NMI, which is subtracted
        assert dom["unit"] == "document" and 0.1 < dom["baseline_mean"] < dom["baseline_high"] < 0.5
        assert dom["corrected"] == pytest.approx(1.0 - dom["baseline_mean"])
        assert dom["adjusted"] == pytest.approx(1.0)
        assert 0 < dom["ci_low"] < dom["corrected"] < dom["ci_high"]
        assert layer["by_label"]["position"]["nmi"] < 0.05
        assert layer["by_label"]["position"]["unit"] == layer["by_label"]["token"]["unit"] == "token"
    assert s["units"] == {"domain": "document", "lang": "document", "position": "token", "token": "token"}
    assert s["step0"] is False and "step0" not in s["layers"][0]["by_label"]["domain"]
    prof = expert_profiles(trace)
    names = trace.label_names["domain"]
    for e in prof["0"]:
        if e["share"] > 0:
            assert e["labels"]["domain"] == {names[e["expert"]]: 1.0}


def test_random_routing_stays_within_shuffled_baseline(tmp_path):
    trace = _routed_trace(tmp_path, lambda lookup: random_experts(8, seed=3), "random")
    s = specialization(trace, n_shuffle=40, n_boot=10, seed=1)
    for layer in s["layers"]:
        for label in ("domain", "lang", "position"):
            v = layer["by_label"][label]
            assert v["baseline_low"] <= v["nmi"] <= v["baseline_high"], (label, v)


def test_corrected_interval_brackets_estimate_and_narrows_with_more_documents():
    from moelab.analysis.specialization import nmi_with_baseline

    rng = np.random.default_rng(0)

    def sample(n_docs):
        doc = np.repeat(np.arange(n_docs), 50)
        label = doc % 4
        expert = np.where(rng.random(doc.size) < 0.6, label, rng.integers(0, 4, doc.size))
        return nmi_with_baseline(expert, label, doc, n_shuffle=5, n_boot=40, seed=0)

    small, large = sample(20), sample(400)
    for r in (small, large):
        assert r["ci_low"] < r["corrected"] < r["ci_high"]
        assert r["baseline_high"] < r["nmi"] and r["ci_low"] > 0
    assert large["ci_high"] - large["ci_low"] < small["ci_high"] - small["ci_low"]

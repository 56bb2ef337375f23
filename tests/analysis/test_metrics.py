"""Load metrics against hand-written formulas; co-activation symmetric with row sums (k−1)·load."""

from __future__ import annotations

import numpy as np
import pytest
from cases import force_routing, small_config, synthetic_data

from moelab.analysis import collect
from moelab.analysis.metrics import balance_stats, coactivation, trace_metrics, transition
from moelab.config import MoEConfig
from moelab.model.transformer import Transformer


@pytest.mark.parametrize("k", [2, 3])
def test_coactivation_symmetric_rows_are_k_minus_1_times_load(tmp_path, k):
    data, _ = synthetic_data(3)
    model = Transformer(small_config(MoEConfig(num_experts=6, top_k=k, expert_hidden=16))).eval()
    m = trace_metrics(collect(model, data, tmp_path / "t", batch_size=4, max_tokens=2048))
    for la in m["layers"]:
        C = np.array(la["coactivation"])
        assert (C == C.T).all() and (np.diag(C) == 0).all()
        np.testing.assert_array_equal(C.sum(axis=1), (k - 1) * np.array(la["load"]))
        assert C.sum() > 0


def test_coactivation_by_hand():
    token = np.array([0, 0, 1, 1, 2, 2])
    expert = np.array([0, 1, 0, 2, 1, 0])
    C = coactivation(token, expert, 3)
    assert C.tolist() == [[0, 2, 1], [2, 0, 0], [1, 0, 0]]


def test_balance_stats_formulas():
    load = np.array([10, 30, 0, 60])
    s = balance_stats(load)
    mean = 25.0
    std = np.sqrt(((load - mean) ** 2).mean())
    assert s["cv"] == pytest.approx(std / mean)
    assert s["max_over_mean"] == pytest.approx(60 / 25)
    p = np.array([0.1, 0.3, 0.6])
    assert s["entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(4))
    assert balance_stats(np.array([5, 5, 5, 5]))["entropy"] == pytest.approx(1.0)


def test_transition_rows_are_distributions():
    a = np.array([0, 0, 1, 1, 1, 2])
    b = np.array([1, 1, 0, 2, 2, 0])
    T = transition(a, b, 4)
    assert T[0].tolist() == [0, 1, 0, 0]
    np.testing.assert_allclose(T[1], [1 / 3, 0, 2 / 3, 0])
    assert T[3].sum() == 0  # expert 3 never top-1: empty row


def test_dead_experts_drop_rate_and_margins(tmp_path):
    data, _ = synthetic_data(3)
    moe = MoEConfig(num_experts=4, top_k=1, expert_hidden=16, capacity_factor=1.0, drop_policy="position")
    model = Transformer(small_config(moe)).eval()
    force_routing(model, lambda shape, ids: (ids % 2))  # experts 2 and 3 never chosen
    trace = collect(model, data, tmp_path / "t", batch_size=4, max_tokens=1024)
    m = trace_metrics(trace)
    for la in m["layers"]:
        assert la["dead_experts"] == [2, 3]
        load = np.array(la["load"])
        kept = np.array(la["kept_load"])
        cap = int(np.ceil(1.0 * 1 * 4 * 32 / 4))  # per batch of 4 sequences
        assert la["drop_rate"] == pytest.approx(1 - kept.sum() / load.sum())
        assert kept.max() <= cap * (trace.num_tokens // (4 * 32))
        assert la["drop_rate"] > 0.3  # two experts of capacity T/4 cannot hold all T tokens
        assert la["top1_margin"] == pytest.approx(0.5 - 0.5 / 3, abs=1e-3)
        assert la["mean_weight"][0] == pytest.approx(1.0)

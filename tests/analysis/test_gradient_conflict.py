"""Gradient conflict: per-domain gradients equal separate masked-loss backward passes; experts
that separate domains give zero whole-layer cosine; cosine matrices are proper."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import DomainLookup, force_routing, small_config, synthetic_data

from moelab.analysis.gradient_conflict import cosine_matrix, domain_gradients, gradient_conflict
from moelab.config import IGNORE_INDEX, MoEConfig
from moelab.data.loader import eval_batches
from moelab.model.transformer import Transformer


def test_cosine_matrix_by_hand():
    a, b, z = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), torch.zeros(3)
    m = cosine_matrix([a, b, z])
    np.testing.assert_allclose(m, [[1, 0.5, 0], [0.5, 1, 0], [0, 0, 0]], atol=1e-12)


def test_domain_gradient_equals_masked_loss_backward():
    data, _ = synthetic_data(3)
    batches = eval_batches(data, 4, 2)
    model = Transformer(small_config(None)).eval()
    values, grads = domain_gradients(model, batches)
    d = values[1]
    model.zero_grad()
    for b in batches:
        target = torch.where(b.label_ids["domain"] == d, b.labels, torch.full_like(b.labels, IGNORE_INDEX))
        logits = model(b.input_ids).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum").backward()
    ffn = model.blocks[1].ffn
    expect = torch.cat([ffn.w_up.weight.grad.reshape(-1), ffn.w_down.weight.grad.reshape(-1)])
    torch.testing.assert_close(grads[d][1], expect, rtol=1e-5, atol=1e-6)


def test_dense_vs_experts_separated_by_domain():
    data, _ = synthetic_data(4)
    batches = eval_batches(data, 8, 4)
    lookup = DomainLookup(8)
    moe = Transformer(small_config(MoEConfig(num_experts=8, top_k=1, expert_hidden=16))).eval()
    force_routing(moe, lookup)

    class Feed(list):
        def __iter__(self):
            for b in list.__iter__(self):
                lookup.current = b
                yield b

    res_moe = gradient_conflict(moe, Feed(batches), names=data.label_names["domain"])
    assert res_moe["values"] == data.label_names["domain"]
    for layer in res_moe["layers"].values():
        m = np.array(layer["matrix"])
        np.testing.assert_allclose(m, np.eye(len(m)), atol=1e-12)  # disjoint experts: orthogonal gradients
        assert layer["mean_offdiag"] == pytest.approx(0.0, abs=1e-12)
    dense = Transformer(replace(small_config(None), ffn_hidden=16)).eval()
    res_dense = gradient_conflict(dense, batches)
    for layer in res_dense["layers"].values():
        m = np.array(layer["matrix"])
        np.testing.assert_allclose(m, m.T, atol=1e-12)
        np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
        assert abs(layer["mean_offdiag"]) > 0.01  # shared weights: domains' gradients overlap


def test_halves_sum_to_the_whole_gradient():
    data, _ = synthetic_data(3)
    batches = eval_batches(data, 4, 3)
    model = Transformer(small_config(MoEConfig(num_experts=4, top_k=2, expert_hidden=16))).eval()
    values, whole = domain_gradients(model, batches)
    values_h, halves = domain_gradients(model, batches, halves=True)
    assert values_h == values
    for d in values:
        for layer, g in whole[d].items():
            assert halves[d][layer].shape == (2, *g.shape)
            torch.testing.assert_close(halves[d][layer].sum(0), g, rtol=1e-5, atol=1e-6)


def test_noise_ceiling_undoes_the_attenuation_of_noisy_gradients():
    """Two domains whose noise-free gradients have cosine 0.6, each observed as two noisy halves:
    the raw cosine of the sums is pulled towards 0 by the noise; divided by the split-half
    (Spearman–Brown) reliabilities it returns to ≈ 0.6 (correction for attenuation)."""
    from moelab.analysis.gradient_conflict import normalised_cosines, split_half_reliability

    g = torch.Generator().manual_seed(0)
    P, c = 200_000, 0.6
    u, v = torch.randn(P, generator=g, dtype=torch.float64), torch.randn(P, generator=g, dtype=torch.float64)
    s1 = u / u.norm()
    w = v - (v @ s1) * s1
    s2 = c * s1 + (1 - c * c) ** 0.5 * w / w.norm()  # cos(s1, s2) = c, both unit length
    halves = [[s / 2 + 0.004 * torch.randn(P, generator=g, dtype=torch.float64) for _ in range(2)] for s in (s1, s2)]
    sums = [a + b for a, b in halves]
    raw = cosine_matrix(sums)
    rel = np.array([split_half_reliability(a, b) for a, b in halves])
    assert raw[0, 1] < 0.5 and (rel < 0.9).all()  # the noise is strong enough to matter
    assert normalised_cosines(raw, rel)[0, 1] == pytest.approx(c, abs=0.02)
    assert np.isnan(normalised_cosines(raw, np.array([0.5, -0.1]))[0, 1])  # no positive reliability: no estimate


def test_gradient_conflict_with_ceiling_reports_normalised_cosines():
    data, _ = synthetic_data(3)
    batches = eval_batches(data, 4, 4)
    moe = Transformer(small_config(MoEConfig(num_experts=4, top_k=2, expert_hidden=16))).eval()
    plain = gradient_conflict(moe, batches)
    res = gradient_conflict(moe, batches, ceiling=True)
    for key, layer in res["layers"].items():
        np.testing.assert_allclose(layer["matrix"], plain["layers"][key]["matrix"], atol=1e-6)  # same raw cosines
        assert len(layer["reliability"]) == len(res["values"])
        for name in ("normalised_mean_offdiag", "per_expert_normalised_mean_offdiag", "per_expert_mean_ceiling"):
            assert name in layer


def test_ceiling_sums_weigh_pairs_by_their_ceiling():
    """Σ cos / Σ sqrt(ρρ') over pairs with a ceiling; a pair whose reliability is not positive is left out
    and counted."""
    from moelab.analysis.gradient_conflict import CeilingSums

    cos = np.array([[1.0, 0.3, 0.1], [0.3, 1.0, 0.2], [0.1, 0.2, 1.0]])
    sums = CeilingSums()
    sums.add(cos, np.array([0.36, 0.25, -0.5]))  # domain 2 has no ceiling
    out = sums.to_json("")
    assert out["normalised_mean_offdiag"] == pytest.approx((0.3 + 0.3) / (0.3 + 0.3))  # sqrt(0.36 * 0.25) = 0.3
    assert out["ceiling_pairs_mean_offdiag"] == pytest.approx(0.3)
    assert out["pairs_without_ceiling"] == pytest.approx(4 / 6)
    assert np.isnan(CeilingSums().to_json("x_")["x_normalised_mean_offdiag"])

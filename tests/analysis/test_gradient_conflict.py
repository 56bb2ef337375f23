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

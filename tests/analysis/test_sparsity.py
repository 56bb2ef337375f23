"""Dense FFN activation sparsity: the hook sees act(W_up x); fractions match a direct count."""

from __future__ import annotations

import pytest
import torch
from cases import small_config, synthetic_data

from moelab.analysis.sparsity import active_fraction, ffn_sparsity
from moelab.data.loader import eval_batches
from moelab.model.transformer import Transformer
from moelab.nn.activations import activate


def test_active_fraction_by_hand():
    h = torch.tensor([[1.0, -0.5, 0.05, 0.0], [0.0, 0.0, 0.0, 2.0]])
    assert active_fraction(h, 0.1).tolist() == [0.5, 0.25]
    assert active_fraction(h, 0.01).tolist() == [0.75, 0.25]


def test_ffn_sparsity_matches_direct_computation():
    data, _ = synthetic_data(3)
    batches = eval_batches(data, 4, 2)
    model = Transformer(small_config(None)).eval()
    captured = {}
    model.blocks[0].ffn_norm.register_forward_hook(lambda m, a, out: captured.setdefault("x", []).append(out))
    res = ffn_sparsity(model, batches, thresholds=(0.05, 0.1), main=0.1)
    mlp = model.blocks[0].ffn
    with torch.no_grad():
        h = torch.cat([activate(mlp.w_up(x), mlp.activation).reshape(-1, mlp.hidden) for x in captured["x"]])
    peak = h.abs().max(-1, keepdim=True).values
    for tau in (0.05, 0.1):
        expect = (h.abs() > tau * peak).float().mean().item()
        assert res["layers"]["0"]["active_fraction"][f"{tau:g}"] == pytest.approx(expect, rel=1e-5)
    assert res["layers"]["0"]["tokens"] == h.shape[0]
    assert sum(res["layers"]["0"]["histogram"]) == pytest.approx(1.0)
    assert set(res["layers"]) == {"0", "1"}
    assert not model.blocks[0].ffn.w_down._forward_pre_hooks  # hooks removed

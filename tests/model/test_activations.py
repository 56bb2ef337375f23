"""ReLU (T5 v1.0, Switch) and gated GELU-tanh (T5 v1.1) in experts and dense FFNs.

Each checked against its formula written out: relu(x) = max(x, 0); GEGLU-tanh =
0.5·g·(1 + tanh(sqrt(2/π)·(g + 0.044715·g³))) · u over the gate rows g and up rows u.
"""

from __future__ import annotations

import math

import pytest
import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.model.transformer import Transformer
from moelab.moe.experts import Experts
from moelab.nn.activations import activate, up_multiplier
from moelab.nn.ffn import DenseMLP


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_formulas() -> None:
    h = torch.randn(5, 14)
    assert torch.equal(activate(h, "relu"), torch.where(h > 0, h, torch.zeros_like(h)))
    g, u = h[:, :7], h[:, 7:]
    assert torch.allclose(activate(h, "geglu_tanh"), _gelu_tanh(g) * u, atol=1e-6)
    assert up_multiplier("geglu_tanh") == 2 and up_multiplier("relu") == 1


@pytest.mark.parametrize("activation", ["relu", "geglu_tanh"])
def test_experts_and_dense_layout(activation: str) -> None:
    E, D, F = 3, 8, 5
    m = 2 if activation == "geglu_tanh" else 1
    experts = Experts(E, D, F, activation)
    assert experts.w_up.shape == (E, m * F, D) and experts.w_down.shape == (E, D, F)
    x = torch.randn(4, D)
    w_up, w_down = experts.w_up[1], experts.w_down[1]
    h = x @ w_up.T
    ref = (torch.relu(h) if m == 1 else _gelu_tanh(h[:, :F]) * h[:, F:]) @ w_down.T
    assert torch.allclose(experts.forward_expert(1, x), ref, atol=1e-6)
    dense = DenseMLP(D, F, activation)
    with torch.no_grad():
        dense.w_up.weight.copy_(w_up)
        dense.w_down.weight.copy_(w_down)
    assert torch.allclose(dense(x), ref, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "geglu_tanh"])
def test_models_build_and_run(activation: str) -> None:
    moe = MoEConfig(num_experts=4, top_k=1, expert_hidden=12, router=MoEConfig().router)
    cfg = ModelConfig(
        vocab_size=50, d_model=16, n_layers=2, n_heads=2, ffn_hidden=20, activation=activation, moe=moe
    )
    out = Transformer(cfg)(torch.randint(0, 50, (2, 6)))
    assert out.logits.shape == (2, 6, 50) and torch.isfinite(out.logits).all()

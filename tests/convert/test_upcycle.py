"""Sparse upcycling: identical experts (or g slices with k = g) reproduce the dense model."""

from __future__ import annotations

import pytest
import torch

from moelab.config import ConfigError, MoEConfig, RouterConfig
from moelab.convert.upcycle import upcycle
from moelab.model.transformer import Transformer

from helpers import tiny_config


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("router_init", ["zeros", "normal"])
def test_identical_experts_equal_the_dense_model(activation, router_init) -> None:
    dense = Transformer(tiny_config(activation=activation, n_layers=3))
    moe = MoEConfig(
        num_experts=4, top_k=2, router=RouterConfig(renormalize=True), placement="every_n", every_n=2
    )
    sparse = upcycle(dense, moe, router_init=router_init)
    assert sparse.cfg.moe_layers == [1] and sparse.cfg.moe.expert_hidden == dense.cfg.ffn_hidden
    ids = torch.randint(0, 97, (2, 9))
    assert torch.allclose(_logits(sparse, ids), _logits(dense, ids), atol=1e-5)
    # every expert holds the dense FFN
    w = sparse.blocks[1].ffn.experts.w_up
    assert torch.equal(w[3], dense.blocks[1].ffn.w_up.weight)


@pytest.mark.parametrize("g", [2, 3])
def test_fine_grained_slices_with_k_equal_g_equal_the_dense_model(g) -> None:
    dense = Transformer(tiny_config())  # F = 48
    sparse = upcycle(
        dense, MoEConfig(num_experts=g, top_k=g, router=RouterConfig(renormalize=True)), granularity=g
    )
    assert sparse.cfg.moe.expert_hidden == 48 // g
    ids = torch.randint(0, 97, (2, 9))
    assert torch.allclose(_logits(sparse, ids), _logits(dense, ids), atol=1e-5)
    # neurons are covered exactly once: slice s holds gate rows [s·f, (s+1)·f) of the dense gate
    f = 48 // g
    assert torch.equal(sparse.blocks[0].ffn.experts.w_up[1][:f], dense.blocks[0].ffn.w_up.weight[f : 2 * f])


def test_noise_and_bad_options() -> None:
    dense = Transformer(tiny_config())
    noisy = upcycle(dense, MoEConfig(num_experts=4, top_k=2), noise_std=0.1)
    w = noisy.blocks[0].ffn.experts.w_up.detach()
    assert not torch.equal(w[0], w[1])
    delta = w[0] - dense.blocks[0].ffn.w_up.weight.detach()
    assert float(delta.std()) == pytest.approx(0.1 * float(w[0].std()), rel=0.3)
    with pytest.raises(ConfigError, match="granularity=5"):
        upcycle(dense, MoEConfig(num_experts=5, top_k=2), granularity=5)
    with pytest.raises(ConfigError, match="router_init='ones'"):
        upcycle(dense, MoEConfig(num_experts=4, top_k=2), router_init="ones")

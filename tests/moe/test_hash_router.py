"""Hash routing: a fixed function of the token id."""

from __future__ import annotations

import pytest
import torch

from moelab.config import ConfigError
from moelab.model.transformer import Transformer
from moelab.moe.layer import MoELayer
from moelab.moe.routers import build_router
from moelab.moe.routers.hash import hash_token_ids
from router_cases import router_case

from helpers import tiny_config

D = 16


@pytest.mark.parametrize("k", [1, 2])
def test_identical_token_ids_always_go_to_the_same_experts(k: int) -> None:
    router = build_router(D, router_case("hash", top_k=k))
    ids = torch.randint(0, 40, (300,))
    d = router(torch.randn(300, D), (3, 100), token_ids_T=ids)  # inputs differ for equal ids
    expert_TK = d.expert.view(300, k)
    for token_id in ids.unique():
        rows = expert_TK[ids == token_id]
        assert (rows == rows[0]).all()
    # ... across calls and a freshly built router too (no state, no learned parameters).
    again = build_router(D, router_case("hash", top_k=k))(torch.randn(300, D), (1, 300), token_ids_T=ids)
    assert torch.equal(again.expert, d.expert)
    assert torch.allclose(d.weight, torch.full_like(d.weight, 1.0 / k))


def test_seed_changes_the_hash_and_ids_spread_over_experts() -> None:
    ids = torch.arange(4000)
    a = hash_token_ids(ids, 0) % 8
    b = hash_token_ids(ids, 1) % 8
    assert (a != b).float().mean() > 0.5
    counts = torch.bincount(a, minlength=8).float()
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()  # roughly uniform


def test_load_follows_token_frequency() -> None:
    router = build_router(D, router_case("hash", top_k=1))
    freq = torch.tensor([400, 100, 40, 10, 3, 1])
    ids = torch.repeat_interleave(torch.tensor([5, 17, 23, 42, 61, 77]), freq)
    d = router(torch.randn(len(ids), D), (1, len(ids)), token_ids_T=ids)
    expected = torch.zeros(8, dtype=torch.long)
    for token_id, f in zip([5, 17, 23, 42, 61, 77], freq.tolist()):
        expected[int(hash_token_ids(torch.tensor([token_id]), 0) % 8)] += f
    assert torch.equal(d.tokens_per_expert(), expected)


def test_hash_without_token_ids_is_a_config_error_naming_the_field() -> None:
    layer = MoELayer(D, router_case("hash"), "swiglu")
    with pytest.raises(ConfigError, match=r"moe\.router\.name='hash'"):
        layer(torch.randn(1, 4, D))
    assert layer(torch.randn(1, 4, D), token_ids_BS=torch.tensor([[1, 2, 3, 1]])).y.shape == (1, 4, D)


def test_transformer_passes_input_ids_to_hash_layers() -> None:
    model = Transformer(tiny_config(moe=router_case("hash")))
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, labels=ids, return_routing=True)
    want = hash_token_ids(ids.reshape(-1), 0) % 8
    for d in out.routing.values():
        assert torch.equal(d.expert.view(-1, 2)[:, 0], want)
    out.total_loss.backward()
    assert model.blocks[0].ffn.experts.w_up.grad is not None

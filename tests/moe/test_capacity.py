"""Capacity limits and drop policies."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.config import RouterConfig
from moelab.moe.capacity import apply_capacity, expert_capacity, keep_within_capacity
from moelab.moe.decision import token_choice_decision
from moelab.moe.layer import MoELayer

from helpers import tiny_moe


def _decision(expert_TK: torch.Tensor, weight_TK: torch.Tensor | None = None, seq: int | None = None):
    T, K = expert_TK.shape
    E = int(expert_TK.max()) + 1
    logits = torch.randn(T, max(E, 4))
    weight_TK = torch.rand(T, K) if weight_TK is None else weight_TK
    return token_choice_decision(expert_TK, weight_TK, logits, logits.softmax(-1), (T // (seq or T), seq or T))


def test_capacity_formula() -> None:
    assert expert_capacity(100, 8, 2, 1.0) == math.ceil(1.0 * 2 * 100 / 8) == 25
    assert expert_capacity(10, 4, 1, 1.25) == math.ceil(1.25 * 10 / 4) == 4
    assert expert_capacity(1, 64, 1, 0.5) == 1


@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("routing", ["random", "all_to_one"])
def test_no_expert_receives_more_than_capacity(policy: str, routing: str) -> None:
    T, K, E = 50, 2, 4
    if routing == "random":
        expert = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    else:
        expert = torch.tensor([[0, 1]]).repeat(T, 1)
    d = apply_capacity(_decision(expert), 1.0, policy, K)
    C = expert_capacity(T, E, K, 1.0)
    assert d.capacity == C
    assert (d.tokens_per_expert() <= C).all()
    if routing == "all_to_one":
        assert d.tokens_per_expert()[:2].tolist() == [C, C]
        assert math.isclose(float(d.drop_rate), 1 - 2 * C / (T * K))


def test_position_policy_drops_the_latest_tokens() -> None:
    T = 40
    expert = torch.zeros(T, 1, dtype=torch.long)
    expert[::4] = 1  # expert 1 gets a few, expert 0 is overloaded
    d = apply_capacity(_decision(expert), 1.0, "position", 1)
    C = expert_capacity(T, d.num_experts, 1, 1.0)
    assert d.capacity == C
    kept0 = d.token[(d.expert == 0) & d.kept]
    dropped0 = d.token[(d.expert == 0) & ~d.kept]
    assert len(kept0) == C and len(dropped0) > 0
    assert kept0.max() < dropped0.min()


def test_score_policy_keeps_the_highest_weights() -> None:
    T = 30
    expert = torch.zeros(T, 1, dtype=torch.long)
    expert[-1] = 3
    weight = torch.rand(T, 1)
    d = apply_capacity(_decision(expert, weight), 1.0, "score", 1)
    w_kept = d.weight[(d.expert == 0) & d.kept]
    w_dropped = d.weight[(d.expert == 0) & ~d.kept]
    assert w_kept.min() > w_dropped.max()


def test_keep_within_capacity_handles_empty_and_single() -> None:
    kept = keep_within_capacity(torch.zeros(0, dtype=torch.long), torch.zeros(0), 4, 2)
    assert kept.shape == (0,)
    kept = keep_within_capacity(torch.tensor([3]), torch.zeros(1), 4, 1)
    assert kept.tolist() == [True]


def test_dropped_tokens_contribute_nothing_and_gradients_reach_router() -> None:
    cfg = tiny_moe(num_experts=4, top_k=1, capacity_factor=0.5, router=RouterConfig())
    layer = MoELayer(16, cfg, "swiglu")
    x = torch.randn(2, 16, 16, requires_grad=True)
    out = layer(x)
    d = out.decision
    assert (~d.kept).any()
    dropped_tokens = d.token[~d.kept]
    y = out.y.reshape(-1, 16)
    assert torch.all(y[dropped_tokens] == 0)
    (out.y * torch.randn_like(out.y)).sum().backward()
    g = layer.router.gate.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_dropless_when_capacity_factor_is_none() -> None:
    layer = MoELayer(16, tiny_moe(capacity_factor=None), "swiglu")
    d = layer(torch.randn(1, 20, 16)).decision
    assert d.kept.all() and d.capacity is None and float(d.drop_rate) == 0.0

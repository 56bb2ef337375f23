"""RoutingStats and the Balancer hook."""

from __future__ import annotations

import math

import torch

from moelab.model.transformer import Transformer
from moelab.moe.balancing import Balancer
from moelab.moe.decision import token_choice_decision
from moelab.moe.stats import LayerStats, RoutingStats

from helpers import tiny_config, tiny_moe


def test_layer_stats_on_known_routing() -> None:
    expert = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    logits = torch.zeros(4, 4)
    d = token_choice_decision(expert, torch.full((4, 2), 0.5), logits, logits.softmax(-1), (1, 4))
    d = d.with_kept(torch.tensor([True, True, True, True, False, True, True, False]), capacity=2)
    s = LayerStats.from_decision(d)
    assert s.load.tolist() == [4, 2, 1, 1]
    assert s.kept_load.tolist() == [2, 2, 1, 1]
    assert math.isclose(s.drop_rate, 2 / 8)
    assert math.isclose(s.max_load, 0.5) and math.isclose(s.max_over_mean, 2.0)
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert math.isclose(s.load_entropy, float(-(p * p.log()).sum() / math.log(4)), rel_tol=1e-6)
    assert math.isclose(s.mean_top1_prob, 0.25)
    # MaxVio (Wang et al. 2024): (max_i Load_i - mean Load) / mean Load = (4 - 2) / 2
    assert math.isclose(s.max_violation, (4 - 8 / 4) / (8 / 4))


def test_padding_is_not_counted() -> None:
    expert = torch.tensor([[0], [1], [1]])
    logits = torch.zeros(3, 2)
    d = token_choice_decision(expert, torch.ones(3, 1), logits, logits.softmax(-1), (1, 3), torch.tensor([1, 1, 0]).bool())
    assert LayerStats.from_decision(d).load.tolist() == [1, 1]


def test_routing_stats_from_model_and_balancer_noop() -> None:
    model = Transformer(tiny_config(moe=tiny_moe()))
    out = model(torch.randint(0, 97, (2, 8)), return_routing=True)
    stats = RoutingStats.from_routing(out.routing)
    assert set(stats.layers) == {0, 1}
    summary = stats.summary()
    assert summary["drop_rate"] == 0.0 and 0.25 <= summary["max_expert_load"] <= 1.0
    balancer = Balancer(model)
    assert not balancer.active
    balancer.update(stats)  # nothing balances by bias: parameters unchanged
    assert RoutingStats.from_routing(None).summary() == {}

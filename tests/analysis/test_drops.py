"""Drops towards the end: with the position policy at capacity factor 1.0 on skewed routing the
drop rate rises with position; with the score policy it does not."""

from __future__ import annotations

import pytest
import torch
from cases import force_routing, small_config, synthetic_data

from moelab.analysis import collect
from moelab.analysis.drops import drop_rate_by_position, quarter_rates, trace_drops, with_capacity
from moelab.config import MoEConfig
from moelab.errors import UserError
from moelab.model.transformer import Transformer
from moelab.moe.capacity import apply_capacity
from moelab.moe.decision import token_choice_decision

S, E = 512, 4


def _skewed_decision(seed=0):
    """One sequence of S tokens; 70% choose expert 0, the rest spread; random scores."""
    g = torch.Generator().manual_seed(seed)
    expert = torch.where(torch.rand(S, generator=g) < 0.7, 0, torch.randint(1, E, (S,), generator=g))
    logits = torch.randn(S, E, generator=g)
    scores = logits.softmax(-1)
    weight = torch.rand(S, 1, generator=g)
    return token_choice_decision(expert[:, None], weight, logits, scores, (1, S))


@pytest.mark.parametrize("policy, rises", [("position", True), ("score", False)])
def test_drop_rate_against_position(policy, rises):
    d = apply_capacity(_skewed_decision(), 1.0, policy, top_k=1)
    assert 0.3 < d.drop_rate < 0.6
    curve = drop_rate_by_position(d.position.numpy(), d.kept.numpy(), S, buckets=16)
    first, last = quarter_rates(curve)
    if rises:
        assert last > first + 0.5
        assert first == 0.0
    else:
        assert abs(last - first) < 0.1


def test_dropless_model_evaluated_with_capacity(tmp_path):
    data, _ = synthetic_data(3)
    model = Transformer(small_config(MoEConfig(num_experts=E, top_k=1, expert_hidden=16))).eval()
    force_routing(model, lambda shape, ids: torch.where(ids % 4 == 0, ids % E, torch.zeros_like(ids)))
    assert model.moe_layers[0].cfg.capacity_factor is None
    with with_capacity(model, 1.0, "position"):
        trace = collect(model, data, tmp_path / "t", batch_size=1, max_tokens=32 * 40)
    assert model.moe_layers[0].cfg.capacity_factor is None  # restored
    res = trace_drops(trace, buckets=8)
    assert res["group_size"] == 32
    for layer in res["layers"].values():
        assert layer["last_quarter"] > layer["first_quarter"]
    dropless = trace_drops(collect(model, data, tmp_path / "u", batch_size=1, max_tokens=32 * 40))
    assert all(max(c["drop_rate"]) == 0 for c in dropless["layers"].values())
    with pytest.raises(UserError, match="drop policy"), with_capacity(model, 1.0, "nope"):
        pass

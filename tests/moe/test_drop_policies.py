"""Drop policies beyond position/score: batch-prioritised routing and dropless; padding goes last."""

from __future__ import annotations

import torch

from moelab.moe.capacity import DROP_POLICIES, apply_capacity, expert_capacity
from moelab.moe.decision import token_choice_decision
from moelab.moe.layer import MoELayer
from moelab.moe.stats import LayerStats
from router_cases import router_case


def _decision(expert_TK, scores_TE, mask_T=None):
    T = expert_TK.shape[0]
    return token_choice_decision(
        expert_TK, scores_TE.gather(1, expert_TK), scores_TE.log(), scores_TE, (1, T), mask_T
    )


def test_registry_has_all_policies() -> None:
    assert set(DROP_POLICIES) >= {"position", "score", "batch_priority", "none"}


def test_batch_priority_keeps_the_most_confident_tokens_first_choices_first() -> None:
    T, E = 8, 4
    scores = torch.full((T, E), 0.1)
    top1 = torch.tensor([0.3, 0.9, 0.5, 0.8, 0.35, 0.6, 0.4, 0.7])
    scores[:, 0] = top1  # every token's first choice is expert 0, second choice expert 1
    scores[:, 1] = 0.2
    scores = scores / scores.sum(-1, keepdim=True)
    expert = torch.tensor([[0, 1]]).repeat(T, 1)
    d = apply_capacity(_decision(expert, scores), 0.5, "batch_priority", 2)
    C = expert_capacity(T, E, 2, 0.5)  # = 2
    assert d.capacity == C == 2
    kept0 = sorted(d.token[(d.expert == 0) & d.kept].tolist())
    assert kept0 == [1, 3]  # the two highest top-1 scores, wherever they sit in the batch
    kept1 = sorted(d.token[(d.expert == 1) & d.kept].tolist())
    assert kept1 == [1, 3]  # second choices ordered the same way
    # position policy would have kept the first tokens instead
    p = apply_capacity(_decision(expert, scores), 0.5, "position", 2)
    assert sorted(p.token[(p.expert == 0) & p.kept].tolist()) == [0, 1]


def test_batch_priority_serves_all_first_choices_before_second_choices() -> None:
    T = 6
    scores = torch.tensor([[0.9, 0.1]] * 3 + [[0.45, 0.55]] * 3)
    expert = scores.topk(2, dim=-1).indices  # tokens 0-2: (0, 1); tokens 3-5: (1, 0)
    d = apply_capacity(_decision(expert, scores), 0.5, "batch_priority", 2)  # C = 3
    kept = d.kept.view(T, 2)
    assert kept[:, 0].all() and not kept[:, 1].any()  # every first choice fits, no second choice does
    assert LayerStats.from_decision(d).drop_rate == 0.5


def test_none_policy_is_dropless_whatever_the_capacity_factor() -> None:
    layer = MoELayer(16, router_case("topk", capacity_factor=0.25, drop_policy="none"), "swiglu")
    d = layer(torch.randn(2, 10, 16)).decision
    assert d.kept.all() and d.capacity is None and float(d.drop_rate) == 0.0
    layer = MoELayer(16, router_case("topk", capacity_factor=0.25, drop_policy="position"), "swiglu")
    assert float(layer(torch.randn(2, 10, 16)).decision.drop_rate) > 0


def test_padding_never_takes_a_real_tokens_slot() -> None:
    T = 10
    expert = torch.zeros(T, 1, dtype=torch.long)
    expert[-1] = 3
    scores = torch.full((T, 4), 0.25)
    mask = torch.tensor([False, False, True, True, True, True, True, True, True, True])
    for policy in ("position", "score", "batch_priority"):
        d = apply_capacity(_decision(expert, scores, mask), 1.0, policy, 1)  # C = 3
        kept_tokens = d.token[(d.expert == 0) & d.kept].tolist()
        assert len(kept_tokens) == 3 and 0 not in kept_tokens and 1 not in kept_tokens, policy

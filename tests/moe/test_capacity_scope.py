"""Capacity counted per sequence (``moe.capacity_scope='sequence'``) and fixed capacities.

References written out independently: per-sequence capacity equals applying the batch-scoped
policy to every sequence alone; a fixed top-1 capacity with position priority equals the
Switch Transformer rule "keep a token iff the running count of its expert within its
sequence is <= C" (the cumulative sum over a one-hot of the choices).
"""

from __future__ import annotations

import pytest
import torch

from moelab.config import ConfigError, MoEConfig
from moelab.moe.capacity import apply_capacity
from moelab.moe.decision import token_choice_decision


def _decision(expert_TK: torch.Tensor, B: int, S: int, E: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B * S, E, generator=g)
    weight = torch.rand(expert_TK.shape, generator=g)
    return token_choice_decision(expert_TK, weight, logits, logits.softmax(-1), (B, S))


@pytest.mark.parametrize("policy", ["position", "score", "batch_priority"])
@pytest.mark.parametrize("K", [1, 2])
def test_sequence_scope_equals_each_sequence_alone(policy: str, K: int) -> None:
    B, S, E = 3, 13, 4
    g = torch.Generator().manual_seed(K)
    expert = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * S)])
    expert[:S] = torch.arange(K)  # sequence 0 sends everything to the same experts: drops there only
    d = _decision(expert, B, S, E)
    scoped = apply_capacity(d, 1.0, policy, K, scope="sequence")
    for b in range(B):
        rows = slice(b * S * K, (b + 1) * S * K)
        alone = token_choice_decision(
            expert[b * S : (b + 1) * S],
            d.weight[rows],
            d.logits[b * S : (b + 1) * S],
            d.scores[b * S : (b + 1) * S],
            (1, S),
        )
        ref = apply_capacity(alone, 1.0, policy, K)
        assert torch.equal(scoped.kept[rows], ref.kept)
    assert not scoped.kept[: S * K].all() and scoped.capacity == -(-K * S // E)
    batch = apply_capacity(d, 1.0, policy, K)  # the flattened batch has room for sequence 0's overflow
    assert scoped.kept.sum() < batch.kept.sum()


def test_fixed_top1_capacity_is_switch_cumsum_rule() -> None:
    B, S, E, C = 4, 17, 3, 3
    g = torch.Generator().manual_seed(5)
    expert_BS = torch.randint(0, E, (B, S), generator=g)
    d = _decision(expert_BS.reshape(-1, 1), B, S, E)
    kept = apply_capacity(d, None, "position", 1, scope="sequence", fixed_capacity=C).kept
    one_hot = torch.nn.functional.one_hot(expert_BS, E)
    running = torch.cumsum(one_hot, dim=1)  # per sequence, per expert
    ref = (running * one_hot).sum(-1) <= C
    assert torch.equal(kept, ref.reshape(-1))
    # batch scope with the same fixed C counts over the flattened batch
    flat = apply_capacity(d, None, "position", 1, scope="batch", fixed_capacity=C).kept
    flat_hot = one_hot.reshape(B * S, E)
    assert torch.equal(flat, (torch.cumsum(flat_hot, 0) * flat_hot).sum(-1) <= C)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"moe\.capacity_scope"):
        MoEConfig(capacity_scope="group")
    with pytest.raises(ConfigError, match=r"moe\.expert_capacity"):
        MoEConfig(expert_capacity=0)
    with pytest.raises(ConfigError, match=r"moe\.expert_capacity"):
        MoEConfig(expert_capacity=4, capacity_factor=1.0)
    assert MoEConfig(expert_capacity=4, capacity_scope="sequence").expert_capacity == 4

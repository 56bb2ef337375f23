"""Pruning dead experts and merging identical ones leave outputs unchanged; merging averages by frequency."""

from __future__ import annotations

import pytest
import torch

from moelab.config import ConfigError, RouterConfig
from moelab.convert.merge import expert_counts, merge_experts, merge_similar, prune_experts, rare_experts
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_moe


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_pruning_experts_that_receive_no_tokens_leaves_outputs_unchanged() -> None:
    model = Transformer(tiny_config(moe=tiny_moe(num_experts=8, top_k=2)))
    ids = torch.randint(0, 97, (1, 2))  # 2 tokens x 2 choices: at most 4 of 8 experts used per layer
    counts = expert_counts(model, [ids])
    assert all(int(c.sum()) == 4 for c in counts.values())
    keep = rare_experts(counts, num_remove=3)
    assert all(int(counts[i][keep[i]].sum()) == 4 for i in keep)  # only dead experts removed
    pruned = prune_experts(model, keep)
    assert pruned.cfg.moe.num_experts == 5
    assert torch.allclose(_logits(pruned, ids), _logits(model, ids), atol=1e-6)
    # router rows follow their experts
    i = pruned.cfg.moe_layers[0]
    assert torch.equal(
        pruned.blocks[i].ffn.router.gate.weight, model.blocks[i].ffn.router.gate.weight[keep[i]]
    )


def test_merging_two_identical_experts_leaves_outputs_unchanged() -> None:
    model = Transformer(
        tiny_config(moe=tiny_moe(num_experts=4, top_k=1, router=RouterConfig(renormalize=True)))
    )
    with torch.no_grad():
        for layer in model.moe_layers:
            for t in (layer.experts.w_up, layer.experts.w_down, layer.router.gate.weight):
                t[3] = t[1]
    ids = torch.randint(0, 97, (2, 12))
    merged = merge_experts(model, {i: [[0], [1, 3], [2]] for i in model.cfg.moe_layers})
    assert merged.cfg.moe.num_experts == 3
    assert torch.allclose(_logits(merged, ids), _logits(model, ids), atol=1e-6)
    # similarity grouping finds the identical pair
    again = merge_similar(model, 3)
    assert torch.allclose(_logits(again, ids), _logits(model, ids), atol=1e-6)


def test_merge_is_the_frequency_weighted_average() -> None:
    model = Transformer(tiny_config(moe=tiny_moe(num_experts=4, top_k=2)))
    counts = {i: torch.tensor([3.0, 1.0, 0.0, 6.0]) for i in model.cfg.moe_layers}
    merged = merge_experts(model, {i: [[0, 3], [1], [2]] for i in model.cfg.moe_layers}, counts)
    i = model.cfg.moe_layers[0]
    old, new = model.blocks[i].ffn, merged.blocks[i].ffn
    expected = (3 * old.experts.w_down[0] + 6 * old.experts.w_down[3]) / 9
    assert torch.allclose(new.experts.w_down[0], expected, atol=1e-6)
    assert torch.allclose(
        new.router.gate.weight[0], (3 * old.router.gate.weight[0] + 6 * old.router.gate.weight[3]) / 9
    )
    assert torch.equal(new.experts.w_up[2], old.experts.w_up[2])
    with pytest.raises(ConfigError, match="same number of experts"):
        merge_experts(model, {i: [[0, 1], [2, 3]]})

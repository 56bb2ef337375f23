"""Router health: metrics, dead experts over N steps, one collapse warning per layer."""

from __future__ import annotations

import math

import torch

from moelab.moe.health import RouterHealth
from moelab.moe.stats import LayerStats, RoutingStats
from router_cases import router_case


def _stats(*loads: list[int], tokens: int = 10) -> RoutingStats:
    return RoutingStats({
        i: LayerStats(load=torch.tensor(load), kept_load=torch.tensor(load), drop_rate=0.0, mean_top1_prob=0.5,
                      num_tokens=tokens)
        for i, load in enumerate(loads)
    })


def test_metrics_per_layer() -> None:
    health = RouterHealth(collapse_share=0.9, collapse_steps=3, dead_steps=5)
    stats = _stats([5, 5, 5, 5], [10, 10, 0, 0], tokens=10)  # K = 2; layer 1: every token picks experts 0 and 1
    health.observe(0, stats)
    m = health.metrics(stats)
    assert math.isclose(m["moe/layer0/max_load"], 0.25) and math.isclose(m["moe/layer0/load_entropy"], 1.0)
    assert math.isclose(m["moe/layer0/max_token_share"], 0.5)
    assert math.isclose(m["moe/layer1/max_load"], 0.5) and math.isclose(m["moe/layer1/load_entropy"], 0.5)
    assert math.isclose(m["moe/layer1/max_token_share"], 1.0)
    assert m["moe/layer0/mean_top1_prob"] == 0.5 and m["moe/layer0/drop_rate"] == 0.0
    assert m["moe/layer1/dead_experts"] == 0.0  # not yet dead after one step


def test_dead_experts_after_n_steps_without_tokens() -> None:
    health = RouterHealth(collapse_share=1.0, collapse_steps=100, dead_steps=5)
    warnings = []
    for step in range(10):
        load = [3, 3, 4, 0] if step >= 2 else [3, 3, 2, 2]
        warnings += health.observe(step, _stats(load))
        if step < 7:  # expert 3 last had tokens at step 1: dead from step 6 on
            assert health.dead_experts(0) == ([] if step < 6 else [3]), step
    assert health.dead_experts(0) == [3]
    assert health.metrics(_stats([3, 3, 4, 0]))["moe/layer0/dead_experts"] == 1.0
    assert len(warnings) == 1 and "layer 0" in warnings[0] and "[3]" in warnings[0]
    health.observe(10, _stats([3, 3, 3, 1]))
    assert health.dead_experts(0) == []  # it came back


def test_collapse_warns_once_naming_the_layer_after_n_steps() -> None:
    health = RouterHealth(collapse_share=0.8, collapse_steps=3, dead_steps=1000)
    collapsed, fine = [9, 1, 0, 0], [3, 3, 2, 2]  # layer 1: expert 0 chosen by 90% of the 10 tokens
    assert health.observe(0, _stats(fine, collapsed)) == []
    assert health.observe(1, _stats(fine, collapsed)) == []
    assert health.observe(2, _stats(fine, fine)) == []  # the run is broken: count starts again
    assert health.observe(3, _stats(fine, collapsed)) == []
    assert health.observe(4, _stats(fine, collapsed)) == []
    warnings = health.observe(5, _stats(fine, collapsed))
    assert len(warnings) == 1 and "layer 1" in warnings[0] and "expert 0" in warnings[0]
    assert health.collapsed(1) and not health.collapsed(0)
    assert health.observe(6, _stats(fine, collapsed)) == []  # once only


def test_thresholds_come_from_the_moe_config() -> None:
    cfg = router_case("topk", health_collapse_share=0.7, health_collapse_steps=4, health_dead_steps=9)
    health = RouterHealth(cfg)
    assert (health.collapse_share, health.collapse_steps, health.dead_steps) == (0.7, 4, 9)


def test_stats_of_micro_batches_add_up_to_the_stats_of_the_whole_batch() -> None:
    from moelab.moe.routers import build_router

    router = build_router(16, router_case("topk", capacity_factor=1.0))
    x = torch.randn(24, 16)
    mask = torch.ones(24, dtype=torch.bool)
    mask[20:] = False
    whole = LayerStats.from_decision(router(x, (2, 12), token_mask_T=mask))
    a = LayerStats.from_decision(router(x[:12], (1, 12), token_mask_T=mask[:12]))
    b = LayerStats.from_decision(router(x[12:], (1, 12), token_mask_T=mask[12:]))
    total = (RoutingStats({0: a}) + RoutingStats({0: b, 1: b})).layers
    assert set(total) == {0, 1} and total[1] is b
    assert torch.equal(total[0].load, whole.load) and total[0].num_tokens == whole.num_tokens == 20
    assert math.isclose(total[0].mean_top1_prob, whole.mean_top1_prob, rel_tol=1e-6)

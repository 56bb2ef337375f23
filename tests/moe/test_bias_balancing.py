"""Aux-loss-free balancing (DeepSeek-V3): the bias update rule and that it balances a skewed router."""

from __future__ import annotations

import torch

from moelab.model.transformer import Transformer
from moelab.moe.balancing import Balancer
from moelab.moe.routers import build_router
from moelab.moe.stats import LayerStats, RoutingStats
from router_cases import router_case

from helpers import tiny_config

D, T = 16, 512


def _skewed_router_and_input():
    """Router whose gate favours experts 0-2 for inputs along one direction, and such inputs."""
    cfg = router_case("sigmoid_bias", seq_aux_coef=0.0, router={"n_group": 1, "topk_group": 1, "bias_update_rate": 0.001})
    router = build_router(D, cfg).eval()
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    x_TD = torch.randn(T, D, generator=g) * 0.5 + 2 * direction
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(8, D, generator=g) * 0.3)
        router.gate.weight[:3] += direction
    return router, x_TD


def _load(router, x_TD) -> torch.Tensor:
    return LayerStats.from_decision(router(x_TD, (4, T // 4))).load.float()


def test_update_rule_is_gamma_sign_of_mean_minus_load() -> None:
    router, _ = _skewed_router_and_input()
    load = torch.tensor([10, 2, 5, 5, 7, 3, 0, 8])  # mean 5
    stats = LayerStats(load=load, kept_load=load, drop_rate=0.0, mean_top1_prob=0.5, num_tokens=20)
    router.update_bias(stats)
    assert torch.allclose(router.bias, 0.001 * torch.tensor([-1.0, 1, 0, 0, -1, 1, 1, -1]))


def test_300_bias_updates_balance_a_skewed_router() -> None:
    router, x_TD = _skewed_router_and_input()
    before = _load(router, x_TD)
    assert before.max() / before.min().clamp_min(1) > 4
    gate_before = router.gate.weight.clone()
    for _ in range(300):
        router.update_bias(LayerStats.from_decision(router(x_TD, (4, T // 4))))
    after = _load(router, x_TD)
    assert after.max() / after.min() < 1.5
    assert torch.equal(router.gate.weight, gate_before)  # only the bias moved
    # Without updates the skew stays.
    fresh, _ = _skewed_router_and_input()
    for _ in range(300):
        fresh(x_TD, (4, T // 4))
    still = _load(fresh, x_TD)
    assert still.max() / still.min().clamp_min(1) > 4


def test_bias_changes_selection_but_not_weights() -> None:
    router, x_TD = _skewed_router_and_input()
    d0 = router(x_TD[:4], (1, 4))
    with torch.no_grad():
        router.bias[5] = 10.0  # force expert 5 into every token's top-k
    d1 = router(x_TD[:4], (1, 4))
    assert (d1.expert.view(4, 2) == 5).any(-1).all()
    s = d1.scores
    w = s.gather(1, d1.expert.view(4, 2))
    want = w / w.sum(-1, keepdim=True) * router.options.routed_scaling_factor
    assert torch.allclose(d1.weight.view(4, 2), want)
    assert torch.equal(d0.scores, d1.scores)


def test_balancer_updates_every_sigmoid_bias_layer_from_routing_stats() -> None:
    model = Transformer(tiny_config(moe=router_case("sigmoid_bias")))
    ids = torch.randint(0, 97, (4, 16))
    out = model(ids, labels=ids, return_routing=True)
    stats = RoutingStats.from_routing(out.routing)
    balancer = Balancer(model)
    assert balancer.active and set(balancer.layers) == {0, 1}
    out.total_loss.backward()
    balancer.update(stats)
    gamma = 0.01
    for i, layer in balancer.layers.items():
        load = stats.layers[i].load.float()
        assert torch.allclose(layer.router.bias, gamma * torch.sign(load.mean() - load))
        assert layer.router.bias.grad is None
    assert "router.bias" in "".join(model.state_dict())  # saved with checkpoints

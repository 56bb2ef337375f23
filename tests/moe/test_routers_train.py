"""Every router trains: a smoke-size model with each router reduces validation loss.

A minimal loop (AdamW, a few dozen steps) on generated sequences, independent of the trainer:
forward → total_loss (LM + weighted router losses) → backward → Balancer.update → step.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moelab.config import preset
from moelab.model.transformer import Transformer
from moelab.moe.balancing import Balancer
from moelab.moe.health import RouterHealth
from moelab.moe.stats import RoutingStats
from router_cases import ROUTER_NAMES, router_case

pytestmark = pytest.mark.filterwarnings("ignore::moelab.moe.routers.expert_choice.NonCausalRouterWarning")

STEPS, BATCH, SEQ = 40, 16, 32


def _sequences(n: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """Arithmetic progressions mod a small range: the next token is predictable from the last two."""
    start = torch.randint(0, 64, (n, 1), generator=g)
    step = torch.randint(1, 5, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ + 1)) % 64 + (vocab - 64)


def _val_loss(model: Transformer, data: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        out = model(data[:, :-1], labels=data[:, 1:])
    model.train()
    return float(out.loss)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_every_router_reduces_validation_loss(name: str) -> None:
    torch.manual_seed(0)
    smoke = preset("smoke")
    cfg = replace(smoke, moe=router_case(name, expert_hidden=64, z_loss_coef=1e-3))
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(1)
    val = _sequences(64, cfg.vocab_size, g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    balancer = Balancer(model)
    assert balancer.active == (name == "sigmoid_bias")
    health = RouterHealth(cfg.moe)
    before = _val_loss(model, val)
    for step in range(STEPS):
        batch = _sequences(BATCH, cfg.vocab_size, g)
        out = model(batch[:, :-1], labels=batch[:, 1:], return_routing=True)
        opt.zero_grad(set_to_none=True)
        out.total_loss.backward()
        stats = RoutingStats.from_routing(out.routing)
        balancer.update(stats)
        opt.step()
        health.observe(step, stats)
    after = _val_loss(model, val)
    assert torch.isfinite(torch.tensor(after))
    assert after < 0.5 * before, (name, before, after)  # from ln(256) ≈ 5.5 to ≈ 1.5 in practice
    assert set(health.metrics(stats)) >= {"moe/layer0/max_load", "moe/layer1/load_entropy"}
    if name == "sigmoid_bias":
        assert any(layer.router.bias.abs().sum() > 0 for layer in balancer.layers.values())

"""The trainer's AdamW: fused where possible, and the same updates as the reference loop."""

from __future__ import annotations

import torch
from torch import nn

from moelab.config import TrainConfig
from moelab.model.transformer import Transformer
from moelab.train.optim import build_optimizer, fused_supported, param_groups

from helpers import tiny_config, tiny_moe


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(moe=tiny_moe()))


def test_trainer_optimizer_is_fused_on_plain_parameters() -> None:
    model = _model()
    assert fused_supported(model)
    opt = build_optimizer(model, TrainConfig())
    assert all(g["fused"] for g in opt.param_groups)
    assert not fused_supported(nn.Linear(2, 2).to(torch.float64))  # the fused kernel takes no float64


def test_fused_adamw_matches_the_for_loop_implementation() -> None:
    """Five steps with weight decay groups: fused and single-tensor AdamW agree to fp32 rounding."""
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig()
    fused = build_optimizer(a, cfg)
    loop = torch.optim.AdamW(
        param_groups(b, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False
    )
    ids = torch.randint(0, 90, (2, 12))
    for _ in range(5):
        for model, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            model(ids).logits.float().square().mean().backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)

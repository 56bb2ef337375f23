"""AdamW with the usual exclusions, and the learning rate of a step (``moelab.train.schedule``).

Why no weight decay on norms, biases and embeddings: decay pulls weights toward zero, which
for gains (norm weights, 1 at init), offsets and lookup rows fights the parametrisation rather
than regularising it (GPT-2/nanoGPT/OLMo practice). Everything with ≥2 dims except the
embedding decays: attention and FFN matrices, stacked expert weights ``[E, …]`` and routers.

The schedule (``train.schedule``: warmup + cosine by default, or warmup–stable–decay) is a pure
function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moelab.config import TrainConfig
from moelab.train import schedule


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and the undecayed rest (norms, biases, embeddings)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay_ids.update(id(p) for p in module.parameters())
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.dim() < 2 or id(p) in no_decay_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters (:func:`param_groups`). Under ``train.precision=bf16-master`` the
    trainer builds :class:`moelab.train.master_weights.MasterWeightAdamW` instead, with the same groups
    and options over fp32 masters."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), **adamw_options(cfg, fused_supported(model))
    )


def adamw_options(cfg: TrainConfig, fused: bool) -> dict[str, Any]:
    """AdamW's keyword arguments for ``cfg``: lr, betas, eps, and the fused kernel where ``fused``."""
    return {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "fused": fused or None}


def fused_supported(model: nn.Module) -> bool:
    """Whether AdamW's fused kernel can take every parameter: plain float tensors on CPU or CUDA.

    Why it matters for MoE: AdamW touches every parameter every step, active or not, so an MoE
    with E/k× the twin's parameters pays E/k× its optimizer time. The default CPU implementation
    loops over parameters in Python; the fused one is one kernel per group (the ``small`` preset,
    212M parameters: 0.16 s a step instead of 0.97 s on this CPU). Sharded parameters (DTensor,
    FSDP2) keep the default implementation.
    """
    params = list(model.parameters())
    return bool(params) and all(
        type(p) is nn.Parameter
        and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in params
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) under ``cfg.schedule``.

    The default (``cosine``): linear warmup over ``warmup_steps`` (step 0 gets lr/warmup), then a cosine
    from ``lr`` down to ``lr·min_lr_ratio`` at the last step. See :mod:`moelab.train.schedule`.
    """
    return schedule.lr_at(step, cfg)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

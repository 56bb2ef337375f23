"""An MoE config checked against what exists: router, balance-loss, drop-policy and dispatch names in
their registries, the router's own options (its ``Options``), and what the router cannot honour.

Why not in the config: ``moelab.config`` is data only and sits below the MoE layer (docs/design.md,
layers); it cannot know which routers exist. Every MoE layer checks its config here when it is built,
and run assembly (``train``, ``compare``, ``config``, ``--init``) checks a run's config before any data is
prepared, so a bad name or option is still one line that names the field, before any work.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

from moelab.config import ModelConfig, MoEConfig, check_field, check_one_of
from moelab.moe.capacity import DROP_POLICIES
from moelab.moe.dispatch import DISPATCHERS
from moelab.moe.losses import BALANCE_LOSSES
from moelab.moe.routers import ROUTERS
from moelab.moe.routers.options import canonical_router

C = TypeVar("C", MoEConfig, ModelConfig)


def check_moe_config(cfg: MoEConfig) -> MoEConfig:
    """``cfg`` with its router options in canonical form (every option the router takes, resolved, and no
    other), or a ConfigError naming the field."""
    check_one_of("moe.router.name", cfg.router.name, ROUTERS)
    check_one_of("moe.aux_loss", cfg.aux_loss, BALANCE_LOSSES)
    check_one_of("moe.drop_policy", cfg.drop_policy, DROP_POLICIES)
    check_one_of("moe.dispatch", cfg.dispatch, DISPATCHERS)
    router = ROUTERS[cfg.router.name]
    canonical = replace(cfg, router=canonical_router(router.Options, cfg.router))
    load = "load" in cfg.loss_coefs()
    check_field(
        not load or router.smooth_load,
        "moe.aux_loss" if cfg.aux_loss == "load" else "moe.load_coef",
        cfg.aux_loss if cfg.aux_loss == "load" else cfg.load_coef,
        f"the smooth 'load' loss needs the noisy_topk router (moe.router.name={cfg.router.name!r}); "
        "use 'load_balance' or 'importance' instead",
    )
    router.validate(canonical)
    return canonical


def router_option(cfg: MoEConfig, key: str) -> Any:
    """The resolved value of the router's option ``key`` (its default when not given), or None when this
    router has no such option (e.g. ``renormalize`` of a ``switch`` router): for exporters and reports."""
    return getattr(ROUTERS[cfg.router.name].options_of(cfg), key, None)


def check_model_config(cfg: C) -> C:
    """:func:`check_moe_config` of a model's MoE block (a dense model is returned as it is)."""
    if isinstance(cfg, MoEConfig):
        return check_moe_config(cfg)
    return cfg if cfg.moe is None else replace(cfg, moe=check_moe_config(cfg.moe))


__all__ = ["check_model_config", "check_moe_config", "router_option"]

"""One small MoEConfig per registered router, shared by the router test files."""

from __future__ import annotations

import warnings

from moelab.config import MoEConfig, RouterConfig
from moelab.moe.routers import ROUTERS
from moelab.moe.routers.expert_choice import NonCausalRouterWarning


def router_case(name: str, **overrides) -> MoEConfig:
    """E=8 experts with each router's typical options (plus ``overrides``)."""
    base: dict = dict(num_experts=8, top_k=2, expert_hidden=16)
    router: dict = {}
    if name == "switch":
        base.update(top_k=1)
        router.update(jitter_eps=0.1)
    elif name == "noisy_topk":
        base.update(aux_loss="importance", load_coef=0.01)
    elif name == "expert_choice":
        base.update(capacity_factor=2.0, aux_loss="none")
    elif name == "sigmoid_bias":
        base.update(aux_loss="none", seq_aux_coef=1e-3)
        router.update(n_group=4, topk_group=2, routed_scaling_factor=2.5, bias_update_rate=0.01)
    elif name == "hash":
        base.update(aux_loss="none")
    router.update(overrides.pop("router", {}))
    base.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonCausalRouterWarning)
        return MoEConfig(router=RouterConfig(name=name, **router), **base)


ROUTER_NAMES = list(ROUTERS)

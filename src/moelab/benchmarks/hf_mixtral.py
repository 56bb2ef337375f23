"""transformers' Mixtral sparse MoE block with moelab's weights, for the ecosystem comparison.

transformers (5.x) picks the experts' forward from ``config._experts_implementation``
(the ``use_experts_implementation`` decorator on ``MixtralExperts``): ``"eager"`` is its
per-expert Python loop, ``"grouped_mm"`` sorts rows and calls ``F.grouped_mm``. Mixtral's
``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]`` are moelab's ``w_up`` / ``w_down``
layouts, so weights copy over unchanged; the router is ``gate.weight [E, D]``.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.moe.layer import MoELayer

HF_IMPLEMENTATIONS = ("eager", "grouped_mm")


def mixtral_block_like(layer: MoELayer, implementation: str, dtype: torch.dtype) -> nn.Module | None:
    """A ``MixtralSparseMoeBlock`` with ``layer``'s weights, or None when transformers is absent.

    bf16 runs the block in bf16 weights and activations, the way transformers users run it
    (its ``grouped_mm`` path is not autocast-aware).
    """
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    experts = layer.experts
    config = MixtralConfig(
        hidden_size=experts.d_model,
        intermediate_size=experts.hidden,
        num_local_experts=experts.num_experts,
        num_experts_per_tok=layer.cfg.top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        block.experts.gate_up_proj.copy_(experts.w_up)
        block.experts.down_proj.copy_(experts.w_down)
    return block.to(device=experts.w_up.device, dtype=dtype)

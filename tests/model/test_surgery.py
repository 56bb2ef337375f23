"""Which modules quantization and decode packing replace, and replacing them by path."""

from __future__ import annotations

from torch import nn

from moelab.model.surgery import is_router_path, set_module, weight_modules
from moelab.model.transformer import Transformer
from moelab.moe.experts import Experts

from helpers import tiny_config, tiny_moe


def test_weight_modules_are_experts_and_linears_outside_routers() -> None:
    model = Transformer(tiny_config(moe=tiny_moe(num_shared_experts=1, shared_gate=True), tie_embeddings=False))
    router_linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and is_router_path(p)]
    assert router_linears  # the test model has router weights to leave alone
    found = dict(weight_modules(model))
    assert not set(router_linears) & set(found)
    assert {p for p, m in found.items() if isinstance(m, Experts)} == {"blocks.0.ffn.experts", "blocks.1.ffn.experts"}
    assert "lm_head" in found and "blocks.0.attn.q_proj" in found and "blocks.0.ffn.shared.gate" in found
    assert {p for p, m in weight_modules(model, linears=False)} == {"blocks.0.ffn.experts", "blocks.1.ffn.experts"}
    assert not is_router_path("blocks.0.ffn.router_like") and is_router_path("blocks.0.ffn.router")


def test_set_module_replaces_by_path() -> None:
    model = Transformer(tiny_config())
    set_module(model, "blocks.1.attn.o_proj", nn.Identity())
    set_module(model, "lm_head", nn.Identity())
    assert isinstance(model.blocks[1].attn.o_proj, nn.Identity) and isinstance(model.lm_head, nn.Identity)

"""Sizes from the config alone (moelab.model.sizes, moelab.calc) against the built model: its
parameters' numel, count_params, and the tensors autograd actually saves."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from moelab.calc import GATED, ROUTER_MATRICES, arch_from_config, count
from moelab.config import MoEConfig, RouterConfig
from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from moelab.model.sizes import (
    activation_values_per_token,
    config_param_count,
    parameter_count,
    training_bytes,
)
from moelab.model.transformer import Transformer
from moelab.model.twins import count_params, dense_twin
from moelab.moe.routers import ROUTERS

from helpers import tiny_config, tiny_mla, tiny_moe


def _numel(model: torch.nn.Module) -> int:
    """Unique parameters of a built model (``parameters()`` yields a tied weight once)."""
    return sum(p.numel() for p in model.parameters())


_PARTIAL = tiny_config(n_layers=4, moe=tiny_moe(num_shared_experts=1, placement="every_n"))

DECODER_CONFIGS = {
    "dense": tiny_config(),
    "dense-untied": tiny_config(tie_embeddings=False),
    "dense-tied": tiny_config(tie_embeddings=True),
    "moe": tiny_config(moe=tiny_moe()),
    "moe-untied": tiny_config(moe=tiny_moe(), tie_embeddings=False),
    "shared-experts": tiny_config(moe=tiny_moe(num_shared_experts=2, shared_hidden=12)),
    "shared-gate": tiny_config(moe=tiny_moe(num_shared_experts=1, shared_gate=True)),
    "fine-grained": tiny_config(moe=tiny_moe(num_experts=16, top_k=4, expert_hidden=6)),
    "first-k-dense": tiny_config(n_layers=3, moe=tiny_moe(placement="first_k_dense", first_k_dense=1)),
    "explicit": tiny_config(n_layers=3, moe=tiny_moe(placement="explicit", layers=(0, 2))),
    "per-layer-hidden": tiny_config(n_layers=3, layer_ffn_hidden=(16, 40, 8)),
    "twin-of-partial-moe": dense_twin(_PARTIAL, "iso_total"),  # layer_ffn_hidden set: sizes differ by layer
    "partial-moe-with-layer-hidden": replace(_PARTIAL, layer_ffn_hidden=(16, 99, 40, 99)),
    "mla": tiny_config(mla=tiny_mla(), moe=tiny_moe()),
    "mla-qlora-biases": tiny_config(mla=tiny_mla(q_lora_rank=10), qkv_bias=True, out_bias=True),
    "gpt2-like": tiny_config(norm="layernorm", activation="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
                             positions="learned"),
    "relu": tiny_config(activation="relu", moe=tiny_moe()),
    "geglu-tanh": tiny_config(activation="geglu_tanh", moe=tiny_moe(num_shared_experts=1)),
    "qk-norm-head": tiny_config(qk_norm="head"),
    "qk-norm-proj": tiny_config(qk_norm="proj", moe=tiny_moe()),
    "attn-head-dim": tiny_config(attn_head_dim=6),
}


@pytest.mark.parametrize("cfg", DECODER_CONFIGS.values(), ids=DECODER_CONFIGS.keys())
def test_decoder_counts_from_the_config_equal_the_built_model(cfg) -> None:
    model = Transformer(cfg)
    assert parameter_count(cfg) == _numel(model)
    assert config_param_count(cfg) == count_params(model)


def _router_moe(name: str) -> MoEConfig:
    top_k = 1 if name == "switch" else 2
    return MoEConfig(num_experts=4, top_k=top_k, expert_hidden=8, router=RouterConfig(name=name))


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_registered_router_is_counted(name: str) -> None:
    """calc's ROUTER_MATRICES (rows of d_model per expert) against each router's own parameters,
    and the whole model's count, for every registry entry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert_choice warns that it is not causal
        cfg = tiny_config(moe=_router_moe(name))
        model = Transformer(cfg)
    router = model.blocks[0].ffn.router
    assert sum(p.numel() for p in router.parameters()) == ROUTER_MATRICES.get(name, 1) * cfg.moe.num_experts * cfg.d_model
    assert config_param_count(cfg) == count_params(model)


def test_calc_gated_activations_are_the_experts_gated_ones() -> None:
    from moelab.nn.activations import GATED as EXPERTS_GATED

    assert GATED == EXPERTS_GATED


ENCODER_DECODER_CONFIGS = {
    "dense-rope": EncoderDecoderConfig.from_model(tiny_config()),
    "moe-both-untied": EncoderDecoderConfig.from_model(tiny_config(moe=tiny_moe(), tie_embeddings=False)),
    "t5-relative": EncoderDecoderConfig.from_model(tiny_config(norm="layernorm"), position="t5_relative"),
    "moe-decoder-only-deeper": EncoderDecoderConfig(
        encoder=tiny_config(attention="bidirectional", n_layers=1),
        decoder=tiny_config(n_layers=3, n_heads=2, n_kv_heads=1, moe=tiny_moe(num_shared_experts=1)),
        position="t5_relative",
        relative_buckets=8,
    ),
}


@pytest.mark.parametrize("cfg", ENCODER_DECODER_CONFIGS.values(), ids=ENCODER_DECODER_CONFIGS.keys())
def test_encoder_decoder_count_equals_the_built_model(cfg) -> None:
    assert parameter_count(cfg) == _numel(EncoderDecoder(cfg))


def test_huge_configs_are_counted_without_allocating() -> None:
    """10⁸ experts: the count is plain arithmetic, the same formula as the tiny models above."""
    cfg = tiny_config(moe=tiny_moe(num_experts=10**8, expert_hidden=24))
    small = tiny_config(moe=tiny_moe(num_experts=4, expert_hidden=24))
    per_expert = 3 * 32 * 24 + 32  # w_up (gate + up), w_down, and the router row
    assert parameter_count(cfg) - parameter_count(small) == 2 * (10**8 - 4) * per_expert


def _saved_activation_values(model: torch.nn.Module, run) -> int:
    """Numbers in the distinct non-parameter tensors autograd saves for backward during ``run()``."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and t.dtype.is_floating_point:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


ACTIVATION_CONFIGS = {k: DECODER_CONFIGS[k] for k in ("dense", "moe", "shared-experts", "fine-grained", "mla", "gpt2-like")}


@pytest.mark.parametrize("cfg", ACTIVATION_CONFIGS.values(), ids=ACTIVATION_CONFIGS.keys())
def test_activation_estimate_is_a_lower_bound_of_what_autograd_saves(cfg) -> None:
    """The guard may only refuse what cannot fit: its activation count must not exceed the tensors
    a training forward really keeps (measured with saved-tensor hooks), and must not be vacuous."""
    model = Transformer(cfg).train()
    B, S = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    measured = _saved_activation_values(model, lambda: model(ids, labels=ids).total_loss)
    ours = activation_values_per_token(cfg) * B * S
    assert measured / 3 <= ours <= measured


def test_training_bytes_add_up() -> None:
    cfg = tiny_config(moe=tiny_moe())
    t = training_bytes(cfg, tokens=100, activation_bytes=2)
    n = parameter_count(cfg)
    assert (t.weights, t.gradients, t.optimizer) == (4 * n, 4 * n, 8 * n)
    assert t.activations == activation_values_per_token(cfg) * 100 * 2
    assert t.total == 16 * n + t.activations
    ed = EncoderDecoderConfig.from_model(cfg)
    assert training_bytes(ed, 100).activations == 2 * activation_values_per_token(cfg) * 100 * 4


@pytest.mark.parametrize("name", ["twin-of-partial-moe", "relu", "geglu-tanh", "mla-qlora-biases"])
def test_calc_describes_configs_it_used_to_miscount_or_refuse(name: str) -> None:
    """Per-layer dense sizes (dense twins of partial-MoE configs) and relu/geglu_tanh were
    ConfigErrors in calc, MLA's biases were left out; now counts and matmul FLOPs match the model
    (FLOPs against torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from moelab.calc import flops_per_token

    cfg = DECODER_CONFIGS[name]
    model = Transformer(cfg).eval()
    a = arch_from_config(cfg)
    assert count(a).total == _numel(model)
    S = 8
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.vocab_size, (1, S)))
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    weight_matmuls = by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0)
    flops = flops_per_token(a, context=S)
    assert weight_matmuls / S == flops["forward"] - flops["forward_attention"]

"""The encoder–decoder against transformers' T5 and Switch Transformers (tiny, random, built in code).

An independent check of the whole architecture (block order, pre-norms, cross-attention, shared
embedding, relative position bias, tied-head scale, Switch top-1 routing): weights are mapped
both ways with the mapping table below and the logits must agree within 1e-4 (fp32). T5's
attention is unscaled; moelab's scales by 1/sqrt(d_kv), so the query weights carry sqrt(d_kv)
on import and lose it on export. The table is what a ``convert/`` mapping for T5/Switch needs.
"""

from __future__ import annotations

import math

import pytest
import torch

from moelab.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig

transformers = pytest.importorskip("transformers")

V, D, HEADS, FF, ENC_LAYERS, DEC_LAYERS, BUCKETS, MAX_DIST, E = 97, 24, 2, 37, 3, 2, 8, 20, 4
DKV = D // HEADS


def _ours(moe: bool) -> EncoderDecoder:
    moe_cfg = (
        MoEConfig(
            num_experts=E,
            top_k=1,
            expert_hidden=FF,
            router=RouterConfig(name="switch"),
            placement="every_n",
            every_n=2,
            aux_loss_coef=0.0,
        )
        if moe
        else None
    )
    cfg = ModelConfig(
        vocab_size=V,
        d_model=D,
        n_layers=ENC_LAYERS,
        n_heads=HEADS,
        ffn_hidden=FF,
        activation="gelu",
        norm="rmsnorm",
        norm_eps=1e-6,
        moe=moe_cfg,
    )
    return EncoderDecoder(
        EncoderDecoderConfig.from_model(
            cfg,
            decoder_layers=DEC_LAYERS,
            position="t5_relative",
            relative_buckets=BUCKETS,
            relative_max_distance=MAX_DIST,
            scale_decoder_output=True,
        )
    ).eval()


def _hf(moe: bool):
    common = dict(
        vocab_size=V,
        d_model=D,
        d_kv=DKV,
        d_ff=FF,
        num_layers=ENC_LAYERS,
        num_decoder_layers=DEC_LAYERS,
        num_heads=HEADS,
        relative_attention_num_buckets=BUCKETS,
        relative_attention_max_distance=MAX_DIST,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    if moe:
        cfg = transformers.SwitchTransformersConfig(
            **common,
            num_experts=E,
            expert_capacity=64,
            encoder_sparse_step=2,
            decoder_sparse_step=2,
            dense_act_fn="gelu",
            router_jitter_noise=0.0,
        )
        return transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
    cfg = transformers.T5Config(**common, feed_forward_proj="gelu")
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _table(model: EncoderDecoder, moe: bool) -> list[tuple[str, str, float]]:
    """(moelab name, HF name, factor: moelab = factor · HF); expert rows use ``name[e]``."""
    rows = [
        ("embed.weight", "shared.weight", 1.0),
        (
            "encoder_relative.bias.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            1.0,
        ),
        (
            "decoder_relative.bias.weight",
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            1.0,
        ),
        ("encoder_norm.weight", "encoder.final_layer_norm.weight", 1.0),
        ("decoder_norm.weight", "decoder.final_layer_norm.weight", 1.0),
    ]

    def attention(ours: str, hf: str) -> None:
        for a, b in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o")):
            rows.append((f"{ours}.{a}_proj.weight", f"{hf}.{b}.weight", math.sqrt(DKV) if a == "q" else 1.0))

    def ffn(ours: str, hf: str, block) -> None:
        if block.is_moe:
            rows.append((f"{ours}.router.gate.weight", f"{hf}.mlp.router.classifier.weight", 1.0))
            for e in range(E):
                rows.append((f"{ours}.experts.w_up[{e}]", f"{hf}.mlp.experts.expert_{e}.wi.weight", 1.0))
                rows.append((f"{ours}.experts.w_down[{e}]", f"{hf}.mlp.experts.expert_{e}.wo.weight", 1.0))
        else:
            inner = "mlp" if moe else "DenseReluDense"
            rows.append((f"{ours}.w_up.weight", f"{hf}.{inner}.wi.weight", 1.0))
            rows.append((f"{ours}.w_down.weight", f"{hf}.{inner}.wo.weight", 1.0))

    for i, block in enumerate(model.encoder_blocks):
        ours, hf = f"encoder_blocks.{i}", f"encoder.block.{i}.layer"
        rows += [
            (f"{ours}.attn_norm.weight", f"{hf}.0.layer_norm.weight", 1.0),
            (f"{ours}.ffn_norm.weight", f"{hf}.1.layer_norm.weight", 1.0),
        ]
        attention(f"{ours}.attn", f"{hf}.0.SelfAttention")
        ffn(f"{ours}.ffn", f"{hf}.1", block)
    for i, block in enumerate(model.decoder_blocks):
        ours, hf = f"decoder_blocks.{i}", f"decoder.block.{i}.layer"
        rows += [
            (f"{ours}.attn_norm.weight", f"{hf}.0.layer_norm.weight", 1.0),
            (f"{ours}.cross_norm.weight", f"{hf}.1.layer_norm.weight", 1.0),
            (f"{ours}.ffn_norm.weight", f"{hf}.2.layer_norm.weight", 1.0),
        ]
        attention(f"{ours}.attn", f"{hf}.0.SelfAttention")
        attention(f"{ours}.cross_attn", f"{hf}.1.EncDecAttention")
        ffn(f"{ours}.ffn", f"{hf}.2", block)
    return rows


def _slot(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name.endswith("]"):
        base, e = name[:-1].split("[")
        return state[base][int(e)]
    return state[name]


@torch.no_grad()
def _import(hf_model, ours: EncoderDecoder, moe: bool) -> None:
    hf_state, our_state = hf_model.state_dict(), ours.state_dict()
    rows = _table(ours, moe)
    for a, b, factor in rows:
        _slot(our_state, a).copy_(hf_state[b] * factor)
    covered = {a.split("[")[0] for a, _, _ in rows} | {"lm_head.weight"}  # lm_head is the tied embedding
    assert covered == set(our_state), set(our_state) ^ covered


@torch.no_grad()
def _export(ours: EncoderDecoder, hf_model, moe: bool) -> None:
    hf_state, our_state = hf_model.state_dict(), ours.state_dict()
    for a, b, factor in _table(ours, moe):
        hf_state[b].copy_(_slot(our_state, a) / factor)
    for tied in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        hf_state[tied].copy_(our_state["embed.weight"])


def _inputs():
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(1, V, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    dec = torch.randint(1, V, (2, 6), generator=g)
    return enc, mask, dec


def _routers(hf_model):
    """Per HF sparse layer, in order, the argmax expert per token (captured by hooks)."""
    seen: list[torch.Tensor] = []
    for name, module in hf_model.named_modules():
        if name.endswith("mlp.router"):
            module.register_forward_hook(lambda m, args, out: seen.append(out[0].argmax(-1).reshape(-1)))
    return seen


@pytest.mark.parametrize("moe", [False, True], ids=["t5", "switch"])
@pytest.mark.parametrize("direction", ["import", "export"])
@torch.no_grad()
def test_logits_and_routing_equal_transformers(moe, direction) -> None:
    torch.manual_seed(1)
    hf_model, ours = _hf(moe), _ours(moe)
    if direction == "import":
        _import(hf_model, ours, moe)
    else:
        _export(ours, hf_model, moe)
    enc, mask, dec = _inputs()
    hf_choices = _routers(hf_model)
    ref = hf_model(input_ids=enc, attention_mask=mask, decoder_input_ids=dec).logits
    out = ours(enc, dec, attention_mask=mask, return_routing=True)
    assert torch.allclose(out.logits, ref, atol=1e-4), (out.logits - ref).abs().max()
    if moe:
        layers = sorted(out.routing)
        assert len(layers) == len(hf_choices) == 2  # encoder.1 and decoder.1
        for layer, hf_expert in zip(layers, hf_choices):
            decision = out.routing[layer]
            expert_T = torch.empty_like(hf_expert)
            expert_T[decision.token] = decision.expert
            assert torch.equal(expert_T, hf_expert)

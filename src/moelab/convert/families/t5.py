"""Encoder–decoder families: T5 (the dense twin's format) and Switch Transformers (top-1 MoE).

Both map onto :class:`~moelab.model.encoder_decoder.EncoderDecoder` with
``position='t5_relative'`` (T5's bucketed relative bias, one table per stack), RMSNorm without
bias, no attention biases, and the unscaled attention folded into the query weights
(:class:`~moelab.convert.rules.Scaled`). Tables: :func:`moelab.convert.tables.t5_tables`.

- Activations: T5 ``relu`` (v1.0) / ``gelu`` / ``gated-gelu`` (v1.1, tanh GELU → ``geglu_tanh``)
  / ``gated-silu`` (→ ``swiglu``) / ``gelu_new`` (dense only); Switch ``dense_act_fn`` relu/gelu.
- Head: transformers 5 ties T5's head to ``shared`` and scales the decoder output by
  d_model^-0.5 when ``scale_decoder_outputs``; a checkpoint whose ``lm_head.weight`` differs
  from ``shared.weight`` (T5 v1.1 as saved by older versions) is imported with an untied head.
  Switch ties and scales when ``tie_word_embeddings``.
- Switch routing: ``switch`` router (top-1 softmax, jitter in training only), capacity counted
  per sequence with HF's fixed ``expert_capacity`` (``moe.capacity_scope='sequence'``,
  ``moe.expert_capacity``), earlier tokens first. Sparse layers: ``i % step == 1`` (or every
  layer when step is 1, none when it is 0), with ``step = encoder_sparse_step`` /
  ``decoder_sparse_step``.

Anything else (router bias, a non-fp32 router, other activations, GQA, biases, RoPE…) is refused
with the field named, on import and on export.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moelab.config import ConfigError, ModelConfig, MoEConfig, RouterConfig
from moelab.convert.families.base import HF, Family, expect, need, placement_in, register, unsupported
from moelab.convert.hf_files import DEFAULT_MAX_SHARD_SIZE, write_hf_config, write_hf_weights
from moelab.convert.rules import check_covered, fill_model, iter_export, table_rules
from moelab.convert.tables import t5_tables
from moelab.errors import UserError
from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from moelab.model.materialize import Filler, ModuleLoaded, empty_model
from moelab.moe.validate import router_option

# T5 feed_forward_proj → (moelab activation, gelu_approx)
_T5_ACTS = {
    "relu": ("relu", "none"),
    "gelu": ("gelu", "none"),
    "gelu_new": ("gelu", "tanh"),
    "gated-gelu": ("geglu_tanh", "none"),
    "gated-gelu_new": ("geglu_tanh", "none"),
    "gated-silu": ("swiglu", "none"),
}
_SWITCH_ACTS = {"relu": "relu", "gelu": "gelu"}
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _stack_fields(hf: HF) -> dict[str, Any]:
    d, heads, d_kv = need(hf, "d_model"), need(hf, "num_heads"), need(hf, "d_kv")
    if d_kv % 2:
        unsupported(hf, "d_kv", d_kv, "moelab's attention blocks need an even head size")
    return dict(
        vocab_size=need(hf, "vocab_size"),
        d_model=d,
        n_heads=heads,
        attn_head_dim=d_kv if d_kv * heads != d else None,
        ffn_hidden=need(hf, "d_ff"),
        norm="rmsnorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        dropout=float(hf.get("dropout_rate", 0.0) or 0.0),
        max_seq_len=int(hf.get("n_positions") or 512),
    )


def _seq2seq(
    hf: HF, stack: dict[str, Any], enc_moe, dec_moe, tied: bool, scale: bool
) -> EncoderDecoderConfig:
    if hf.get("is_encoder_decoder") is False:
        unsupported(hf, "is_encoder_decoder", False, "only encoder–decoder checkpoints are imported")
    n_enc = need(hf, "num_layers")
    n_dec = hf.get("num_decoder_layers") or n_enc
    enc = ModelConfig(**stack, n_layers=n_enc, attention="bidirectional", moe=enc_moe, tie_embeddings=tied)
    dec = ModelConfig(**stack, n_layers=n_dec, attention="causal", moe=dec_moe, tie_embeddings=tied)
    return EncoderDecoderConfig(
        encoder=enc,
        decoder=dec,
        position="t5_relative",
        relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        scale_decoder_output=scale,
    )


def t5_config_in(hf: HF) -> EncoderDecoderConfig:
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _T5_ACTS:
        unsupported(hf, "feed_forward_proj", proj, f"moelab imports {', '.join(sorted(_T5_ACTS))}")
    act, approx = _T5_ACTS[proj]
    scale = (
        hf["scale_decoder_outputs"]
        if "scale_decoder_outputs" in hf
        else hf.get("tie_word_embeddings") is not False
    )
    stack = {**_stack_fields(hf), "activation": act, "gelu_approx": approx}
    return _seq2seq(hf, stack, None, None, tied=True, scale=bool(scale))


def sparse_layers(n_layers: int, step: int) -> list[int]:
    """Switch's sparse layers of a stack: ``i % step == 1`` (all when step == 1, none when step <= 0)."""
    return [i for i in range(n_layers) if step > 0 and (step == 1 or i % step == 1)]


def _sparse_step(hf: HF, stack: str, n_layers: int) -> int:
    if f"{stack}_sparse_step" in hf:
        return int(hf[f"{stack}_sparse_step"])
    k = int(hf.get(f"num_sparse_{stack}_layers", 3))
    return n_layers // k if k > 0 else n_layers


def switch_config_in(hf: HF) -> EncoderDecoderConfig:
    act = hf.get("dense_act_fn", "relu")
    if act not in _SWITCH_ACTS:
        unsupported(hf, "dense_act_fn", act, f"Switch experts are imported with {', '.join(_SWITCH_ACTS)}")
    if hf.get("router_bias"):
        unsupported(hf, "router_bias", True, "moelab's routers have no bias")
    if hf.get("router_dtype", "float32") != "float32":
        unsupported(hf, "router_dtype", hf["router_dtype"], "moelab computes routers in float32")
    stack = {**_stack_fields(hf), "activation": _SWITCH_ACTS[act]}
    n_enc = need(hf, "num_layers")
    n_dec = hf.get("num_decoder_layers") or n_enc

    def moe(stack_name: str, n: int) -> MoEConfig | None:
        layers = sparse_layers(n, _sparse_step(hf, stack_name, n))
        if not layers:
            return None
        return MoEConfig(
            num_experts=need(hf, "num_experts"),
            top_k=1,
            expert_hidden=stack["ffn_hidden"],
            router=RouterConfig(name="switch", jitter_eps=float(hf.get("router_jitter_noise") or 0.0)),
            aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            z_loss_coef=float(hf.get("router_z_loss_coef", 0.001)),
            capacity_scope="sequence",
            expert_capacity=int(need(hf, "expert_capacity")),
            drop_policy="position",
            **placement_in(n, layers),
        )

    tied = hf.get("tie_word_embeddings", True) is not False
    return _seq2seq(hf, stack, moe("encoder", n_enc), moe("decoder", n_dec), tied=tied, scale=tied)


# --------------------------------------------------------------------------- export configs


def _common_out(cfg: EncoderDecoderConfig, family: str) -> HF:
    enc, dec = cfg.encoder, cfg.decoder
    expect(cfg, family, {"position": (cfg.position, "t5_relative")})
    for name, c in (("encoder", enc), ("decoder", dec)):
        expect(
            cfg,
            family,
            {
                f"{name}.norm": (c.norm, "rmsnorm"),
                f"{name}.qkv_bias": (c.qkv_bias, False),
                f"{name}.out_bias": (c.out_bias, False),
                f"{name}.mlp_bias": (c.mlp_bias, False),
                f"{name}.qk_norm": (c.qk_norm, "none"),
                f"{name}.mla": (c.mla, None),
                f"{name}.n_kv_heads": (c.n_kv_heads, c.n_heads),
                f"{name}.layer_ffn_hidden": (c.layer_ffn_hidden, ()),
            },
        )
    for f in ("n_heads", "head_dim", "ffn_hidden", "activation", "gelu_approx", "norm_eps", "dropout"):
        expect(cfg, family, {f"decoder.{f}": (getattr(dec, f), getattr(enc, f))})  # one config.json value
    return dict(
        is_encoder_decoder=True,
        vocab_size=enc.vocab_size,
        d_model=enc.d_model,
        d_kv=enc.head_dim,
        d_ff=enc.ffn_hidden,
        num_layers=enc.n_layers,
        num_decoder_layers=dec.n_layers,
        num_heads=enc.n_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=enc.dropout,
        layer_norm_epsilon=enc.norm_eps,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dtype="float32",
    )


def t5_config_out(cfg: EncoderDecoderConfig) -> HF:
    expect(cfg, "t5", {"encoder.moe": (cfg.encoder.moe, None), "decoder.moe": (cfg.decoder.moe, None)})
    expect(cfg, "t5", {"decoder.tie_embeddings": (cfg.decoder.tie_embeddings, True)})  # transformers 5 ties
    acts = {v: k for k, v in _T5_ACTS.items() if k != "gated-gelu_new"}
    key = (cfg.encoder.activation, cfg.encoder.gelu_approx)
    if key not in acts:
        raise ConfigError(
            f"cannot export as t5: activation {key[0]!r} (gelu_approx {key[1]!r}) has no T5 form"
        )
    return dict(
        architectures=["T5ForConditionalGeneration"],
        model_type="t5",
        **_common_out(cfg, "t5"),
        feed_forward_proj=acts[key],
        scale_decoder_outputs=cfg.scale_decoder_output,
        tie_word_embeddings=True,
    )


def _step_out(c: ModelConfig, stack: str) -> int:
    """The sparse step whose Switch pattern is exactly this stack's MoE layers (ConfigError if none)."""
    have = [i for i in range(c.n_layers) if c.is_moe_layer(i)]
    for step in range(0, c.n_layers + 1):
        if sparse_layers(c.n_layers, step) == have:
            return step
    raise ConfigError(
        f"cannot export as switch_transformers: {stack} MoE layers {have} are not Switch's pattern "
        "(layers i with i % step == 1, or all, or none)"
    )


def switch_config_out(cfg: EncoderDecoderConfig) -> HF:
    moes = [c.moe for c in (cfg.encoder, cfg.decoder) if c.moe is not None]
    if not moes:
        raise ConfigError(
            "cannot export as switch_transformers: neither stack has MoE layers (export it as t5)"
        )
    for stack in ("encoder", "decoder"):
        c: ModelConfig = getattr(cfg, stack)
        if c.moe is None:
            continue
        expect(
            cfg,
            "switch_transformers",
            {
                f"{stack}.moe.router.name": (c.moe.router.name, "switch"),
                f"{stack}.moe.num_shared_experts": (c.moe.num_shared_experts, 0),
                f"{stack}.moe.expert_hidden": (c.moe.expert_hidden, c.ffn_hidden),
                f"{stack}.moe.capacity_factor": (c.moe.capacity_factor, None),
                f"{stack}.moe.drop_policy": (c.moe.drop_policy, "position"),
            },
        )
        if c.moe.expert_capacity is not None:
            expect(
                cfg,
                "switch_transformers",
                {f"{stack}.moe.capacity_scope": (c.moe.capacity_scope, "sequence")},
            )
    m = moes[0]
    for other in moes[1:]:  # one config.json for both stacks
        for f in ("num_experts", "router", "aux_loss_coef", "z_loss_coef", "expert_capacity"):
            expect(cfg, "switch_transformers", {f"decoder.moe.{f}": (getattr(other, f), getattr(m, f))})
    expect(
        cfg,
        "switch_transformers",
        {"scale_decoder_output": (cfg.scale_decoder_output, cfg.decoder.tie_embeddings)},
    )
    if cfg.encoder.activation not in _SWITCH_ACTS:
        raise ConfigError(
            f"cannot export as switch_transformers: model.activation={cfg.encoder.activation!r} "
            f"(Switch experts are {' or '.join(map(repr, _SWITCH_ACTS))})"
        )
    # dropless exports with a capacity no sequence up to max_seq_len can exceed
    capacity = m.expert_capacity or max(cfg.encoder.max_seq_len, cfg.decoder.max_seq_len)
    enc_step, dec_step = _step_out(cfg.encoder, "encoder"), _step_out(cfg.decoder, "decoder")
    return dict(
        architectures=["SwitchTransformersForConditionalGeneration"],
        model_type="switch_transformers",
        **_common_out(cfg, "switch_transformers"),
        dense_act_fn=cfg.encoder.activation,
        num_experts=m.num_experts,
        expert_capacity=capacity,
        encoder_sparse_step=enc_step,
        decoder_sparse_step=dec_step,
        num_sparse_encoder_layers=len(sparse_layers(cfg.encoder.n_layers, enc_step)),
        num_sparse_decoder_layers=len(sparse_layers(cfg.decoder.n_layers, dec_step)),
        router_bias=False,
        router_dtype="float32",
        router_jitter_noise=router_option(m, "jitter_eps"),
        router_aux_loss_coef=m.aux_loss_coef,
        router_z_loss_coef=m.z_loss_coef,
        router_ignore_padding_tokens=False,
        tie_word_embeddings=cfg.decoder.tie_embeddings,
    )


# --------------------------------------------------------------------------- tensors


def _keys(model: EncoderDecoder) -> set[str]:
    keys = set(model.state_dict())
    return keys - {"lm_head.weight"} if model.cfg.decoder.tie_embeddings else keys


def _rules(family: str, hf: HF, model: EncoderDecoder) -> list:
    cfg = model.cfg
    gated = family == "t5" and str(hf.get("feed_forward_proj", "relu")).startswith("gated-")
    top, enc_table, dec_table = t5_tables(
        "mlp" if family == "switch_transformers" else "DenseReluDense", gated
    )
    keys = _keys(model)
    rules = table_rules(top, "", "", cfg.decoder, keys)
    for i in range(cfg.encoder.n_layers):
        rules += table_rules(
            enc_table, f"encoder_blocks.{i}.", f"encoder.block.{i}.layer.", cfg.encoder, keys
        )
    for i in range(cfg.decoder.n_layers):
        rules += table_rules(
            dec_table, f"decoder_blocks.{i}.", f"decoder.block.{i}.layer.", cfg.decoder, keys
        )
    return check_covered(rules, keys)


def import_seq2seq(
    family: Family,
    hf: HF,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    where: str = "the checkpoint",
    on_module_loaded: ModuleLoaded | None = None,
) -> EncoderDecoder:
    """An HF T5/Switch folder's config and tensors (a dict, or a reader that reads on demand) →
    :class:`EncoderDecoder` in ``dtype`` on ``device``, eval mode, filled one mapping rule at a time."""
    cfg = family.config_in(hf)
    shared = tensors.get("shared.weight")
    if shared is not None and "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"], shared):
        cfg = replace(cfg, decoder=replace(cfg.decoder, tie_embeddings=False))  # a separately trained head
    for name in _EMBED_COPIES:  # transformers 5 keeps them apart from shared.weight when untied
        if name in tensors and shared is not None and not torch.equal(tensors[name], shared):
            raise UserError(
                f"{name} differs from shared.weight: moelab's encoder and decoder share one embedding "
                "(separate stack embeddings are not supported)"
            )
    del shared
    model = empty_model(lambda: EncoderDecoder(cfg), dtype, device)
    tied = cfg.decoder.tie_embeddings

    def ignore(name: str) -> bool:
        return name in _EMBED_COPIES or (tied and name == "lm_head.weight")

    fill_model(Filler(model, device, where, on_module_loaded), _rules(family.model_type, hf, model), tensors, ignore)
    return model.eval()


def export_seq2seq(
    model: EncoderDecoder, path: str | Path, family: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> Path:
    """Write ``model`` as a ``t5`` (dense) or ``switch_transformers`` (MoE) folder, streamed (see hf_files)."""
    cfg = model.cfg
    name = family or ("t5" if cfg.encoder.moe is None and cfg.decoder.moe is None else "switch_transformers")
    if name not in ("t5", "switch_transformers"):
        raise ConfigError(f"cannot export an encoder–decoder as {name!r}: use 't5' or 'switch_transformers'")
    fam = _FAMILIES_BY_NAME[name]
    hf = fam.config_out(cfg)
    rules = _rules(name, hf, model)
    untied = not cfg.decoder.tie_embeddings

    def produce(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        for n, t in iter_export(rules, state):
            yield n, t
            if untied and n == "shared.weight":  # transformers 5 then loads the stacks' embeddings separately
                yield from ((copy, t) for copy in _EMBED_COPIES)

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_hf_config(out, hf, write_hf_weights(out, produce, model.state_dict(), max_shard_size))
    return out


T5 = Family("t5", "T5ForConditionalGeneration", lambda hf: None, t5_config_in, t5_config_out, seq2seq=True)  # type: ignore[arg-type]
SWITCH = Family(
    "switch_transformers",
    "SwitchTransformersForConditionalGeneration",
    lambda hf: None,  # type: ignore[arg-type,return-value]
    switch_config_in,  # type: ignore[arg-type]
    switch_config_out,  # type: ignore[arg-type]
    seq2seq=True,
)
_FAMILIES_BY_NAME = {"t5": T5, "switch_transformers": SWITCH}
register(T5)
register(SWITCH)

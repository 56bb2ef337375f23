"""Which halves of a block a batch-1 decoder can run as one native call each, and building those calls.

Why: an MoE block at batch 1 is a dozen small operations (router, top-k, combine weights, two
experts' projections and activations, the weighted sum), each paying Python and dispatch
overhead that its dense twin pays two or three times, and the attention half is another dozen
(norm, q/k/v, RoPE, cache write, attention, o, residual); :mod:`moelab.native.fused` runs each
half, pre-norm and residual included, in one call. The rules here decide when that is the same
computation:

- weights in a native layout: bf16 or fp32 from :class:`moelab.infer.packed.NativeLinear` /
  :class:`~moelab.infer.packed.NativeExperts`, or weight-only int8/int4 layers
  (:class:`moelab.quant.QuantLinear`) packed for the native kernels, without K padding or bias;
- SwiGLU (the gate rows then the up rows of ``w_up``), activations in bf16 or fp32 (the
  weights' dtype for bf16/fp32 weights);
- MoE: a router whose lone-token decision is a softmax top-k (its ``decode_spec()``),
  with its fp32 gate weight; renormalised, raw or softmax-after-top-k combine weights; a shared
  expert inside the call when it is a plain SwiGLU in a native layout;
- attention: grouped-query with rotate-half RoPE, no biases or q/k norms, causal, a static cache;
- norms: RMSNorm with a weight (else the norm runs in Python and the block call without it).

Anything else returns None and the decoder runs the block's modules as before. Results equal
the eager modules to rounding (tested); routing takes the same experts except at exact ties.

Legend: D model dim, F hidden, E experts, G key/value heads, M cached positions, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.infer.packed import NativeExperts, NativeLinear
from moelab.moe.routers.base import DecodeSpec
from moelab.native.fused import (
    KIND_BF16,
    KIND_F32,
    KIND_INT4,
    KIND_INT8,
    FusedAttention,
    FusedExpertRows,
    FusedFFN,
    FusedMoE,
    Mat,
    Norm,
    make_mat,
)
from moelab.nn.ffn import DenseMLP


def native_mat(mod: nn.Module, act_dtype: torch.dtype) -> tuple[Mat, tuple[Tensor, ...]] | None:
    """A linear map in a native layout as a :class:`Mat` plus the tensors it points into."""
    from moelab.quant import QuantLinear

    if isinstance(mod, NativeLinear):
        if mod.bias is not None or act_dtype != mod.dtype:
            return None
        kind = KIND_BF16 if mod.dtype == torch.bfloat16 else KIND_F32
        return make_mat(kind, mod.out_features, mod.in_features, mod.packed), (mod.packed,)
    if isinstance(mod, QuantLinear):
        if mod.bias is not None or mod.k_padded != mod.in_features:
            return None
        packed = mod.pack_for(torch.device("cpu"))
        if mod.layout != f"native-int{mod.bits}":
            return None
        scales = mod.scales if mod.bits == 8 else mod.scales_zeros
        if scales.dtype != act_dtype or act_dtype not in (torch.float32, torch.bfloat16):
            return None
        kind = KIND_INT8 if mod.bits == 8 else KIND_INT4
        group = mod.group_size if mod.bits == 4 else 0
        return make_mat(kind, mod.out_features, mod.in_features, packed, scales, group), (packed, scales)
    return None


def _expert_mats(experts: nn.Module, act_dtype: torch.dtype) -> tuple[list[Mat], list[Mat], tuple[Tensor, ...]] | None:
    from moelab.quant import QuantExperts

    ups, downs, keep = [], [], []
    if isinstance(experts, NativeExperts):
        if act_dtype != experts.dtype:
            return None
        kind = KIND_BF16 if experts.dtype == torch.bfloat16 else KIND_F32
        for e in range(experts.num_experts):
            ups.append(make_mat(kind, experts.up_rows, experts.d_model, experts._up[e]))
            downs.append(make_mat(kind, experts.d_model, experts.hidden, experts._down[e]))
            keep += [experts._up[e], experts._down[e]]
        return ups, downs, tuple(keep)
    if isinstance(experts, QuantExperts):
        for e in range(experts.num_experts):
            up, down = native_mat(experts.up[e], act_dtype), native_mat(experts.down[e], act_dtype)
            if up is None or down is None:
                return None
            ups.append(up[0])
            downs.append(down[0])
            keep += [*up[1], *down[1]]
        return ups, downs, tuple(keep)
    return None


def fused_ffn(mlp: nn.Module, act_dtype: torch.dtype) -> FusedFFN | None:
    """A dense SwiGLU block as one native call, or None (see module doc)."""
    if type(mlp) is not DenseMLP or mlp.activation != "swiglu":  # GatedDenseMLP scales by its own gate
        return None
    up, down = native_mat(mlp.w_up, act_dtype), native_mat(mlp.w_down, act_dtype)
    if up is None or down is None or up[0].n != 2 * down[0].k or down[0].n != up[0].k:
        return None
    return FusedFFN(up[0], down[0], act_dtype == torch.bfloat16, (*up[1], *down[1]))


def fused_moe(ffn: nn.Module, act_dtype: torch.dtype, spec: DecodeSpec) -> FusedMoE | None:
    """An MoE block's router and routed experts as one native call, or None. ``spec`` is the router's own
    account of its lone-token decision (:meth:`~moelab.moe.routers.base.Router.decode_spec`: the native
    call computes exactly that); shared experts stay outside the call."""
    experts = ffn.experts
    if getattr(experts, "activation", None) != "swiglu" or experts.num_experts > 256 or spec.top_k > 64:
        return None
    mats = _expert_mats(experts, act_dtype)
    if mats is None:
        return None
    gate = ffn.router.gate
    if gate.bias is not None or gate.weight.dtype != torch.float32:
        return None
    ups, downs, keep = mats
    return FusedMoE(ups, downs, gate.weight.detach(), spec.top_k, spec.weights, act_dtype == torch.bfloat16, keep)


def fused_expert_rows(experts: nn.Module, act_dtype: torch.dtype) -> FusedExpertRows | None:
    """An MoE block's routed SwiGLU experts for several tokens at once (batched decode) as one native
    call taking the module router's decision, or None (see module doc)."""
    from moelab.native.build import library

    if library() is None or getattr(experts, "activation", None) != "swiglu":
        return None
    mats = _expert_mats(experts, act_dtype)
    if mats is None:
        return None
    ups, downs, keep = mats
    return FusedExpertRows(ups, downs, act_dtype == torch.bfloat16, keep)


def norm_of(norm: nn.Module, act_dtype: torch.dtype) -> Norm | None:
    """An RMSNorm with a weight in the activation dtype and an explicit eps, as a :class:`Norm`."""
    if type(norm) is not nn.RMSNorm or norm.weight is None or norm.eps is None or norm.weight.dtype != act_dtype:
        return None
    return Norm(norm.weight, norm.eps)


def fused_attention(block: nn.Module, cfg, act_dtype: torch.dtype) -> FusedAttention | None:
    """A block's attention half (pre-norm, q/k/v, RoPE, cache write, attention, o, residual) as
    one native call, or None: needs grouped-query attention with rotate-half RoPE, no biases or
    q/k norms, an RMSNorm, and native weights."""
    from moelab.model.transformer import Attention

    attn = block.attn
    if type(attn) is not Attention or cfg.positions != "rope" or attn.qk_norm != "none" or cfg.attention != "causal":
        return None
    norm = norm_of(block.attn_norm, act_dtype)
    mats = [native_mat(getattr(attn, name), act_dtype) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if norm is None or any(m is None for m in mats):
        return None
    keep = tuple(t for m in mats for t in m[1])  # type: ignore[index]
    q, k, v, o = (m[0] for m in mats)  # type: ignore[index]
    bf16 = act_dtype == torch.bfloat16
    return FusedAttention(q, k, v, o, norm, attn.n_heads, attn.n_kv_heads, attn.head_dim, bf16, (*keep, norm.weight))


def attention_step(block: nn.Module, cfg, act_dtype: torch.dtype):
    """The attention half of one block at batch 1 as a callable ``(x [1, 1, D], rope, cache
    layer) → None`` that updates x in place and fills the cache, or None."""
    from moelab.native.build import library

    if library() is None:
        return None
    fused = fused_attention(block, cfg, act_dtype)
    if fused is None:
        return None

    def step(x: Tensor, rope: tuple[Tensor, Tensor], layer) -> None:
        if not layer.is_static:
            raise ValueError("fused attention needs a static KV cache layer")
        fused.add_to(x.view(-1), rope[0], rope[1], layer.k, layer.v, layer.length)
        layer.length += 1

    return step


def block_step(block: nn.Module, act_dtype: torch.dtype, spec: DecodeSpec | None):
    """The feed-forward half of one block at batch 1 (pre-norm, block, residual) as a callable
    ``x [1, 1, D] → None`` updating x in place, built on the native calls above, or None when
    the block does not qualify."""
    from moelab.native.build import library

    if library() is None:
        return None
    ffn = block.ffn
    norm = norm_of(block.ffn_norm, act_dtype)
    if not block.is_moe:
        step = fused_ffn(ffn, act_dtype)
        if step is None:
            return None
        if norm is not None:
            step.norm = norm
            return lambda x: step.add_to(x.view(-1))
        return lambda x: x.add_(step(block.ffn_norm(x).reshape(-1)).view_as(x))
    moe = fused_moe(ffn, act_dtype, spec) if spec is not None else None
    if moe is None:
        return None
    shared = None if ffn.shared is None else fused_ffn(ffn.shared, act_dtype)
    if norm is not None and (ffn.shared is None or shared is not None):
        moe.norm, moe.shared = norm, shared
        return lambda x: moe.add_to(x.view(-1))

    def unfused_norm(x: Tensor) -> None:
        h = block.ffn_norm(x)
        y = moe(h.reshape(-1)).view_as(h)
        x.add_(y if ffn.shared is None else y + ffn.shared(h))

    return unfused_norm


__all__ = [
    "attention_step", "block_step", "fused_attention", "fused_expert_rows", "fused_ffn", "fused_moe", "native_mat", "norm_of",
]  # fmt: skip

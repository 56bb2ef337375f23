"""Which feed-forward blocks a batch-1 decoder can run as one native call, and building those calls.

Why: an MoE block at batch 1 is a dozen small operations (router, top-k, combine weights, two
experts' projections and activations, the weighted sum), each paying Python and dispatch
overhead that its dense twin pays two or three times; :mod:`moelab.native.fused` runs the whole
block, router included, in one call. The rules here decide when that is the same computation:

- weights in a native layout: bf16 or fp32 from :class:`moelab.infer.packed.NativeLinear` /
  :class:`~moelab.infer.packed.NativeExperts`, or weight-only int8/int4 layers
  (:class:`moelab.quant.QuantLinear`) packed for the native kernels, without K padding or bias;
- SwiGLU (the gate rows then the up rows of ``w_up``), activations in bf16 or fp32 (the
  weights' dtype for bf16/fp32 weights);
- MoE: a plain softmax top-k router (what :func:`moelab.infer.fast_decode._plain_topk` accepts),
  with its fp32 gate weight; renormalised, raw or softmax-after-top-k combine weights.

Anything else returns None and the decoder runs the block's modules as before. Results equal
the eager modules to rounding (tested); routing takes the same experts except at exact ties.

Legend: D model dim, F hidden, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.infer.packed import NativeExperts, NativeLinear
from moelab.model.mlp import DenseMLP
from moelab.native.fused import KIND_BF16, KIND_F32, KIND_INT4, KIND_INT8, FusedFFN, FusedMoE, Mat, make_mat


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


def route_mode(router) -> str:
    rcfg = router.cfg.router
    if rcfg.softmax_after_topk:
        return "softmax_after_topk"
    return "renormalize" if rcfg.renormalize else "probs"


def fused_moe(ffn: nn.Module, act_dtype: torch.dtype) -> FusedMoE | None:
    """An MoE block's router and routed experts as one native call, or None. The caller has
    checked the router (a plain softmax top-k, see :func:`moelab.infer.fast_decode._plain_topk`);
    shared experts stay outside the call."""
    experts = ffn.experts
    if getattr(experts, "activation", None) != "swiglu" or experts.num_experts > 256 or ffn.router.top_k > 64:
        return None
    mats = _expert_mats(experts, act_dtype)
    if mats is None:
        return None
    gate = ffn.router.gate
    if gate.bias is not None or gate.weight.dtype != torch.float32:
        return None
    ups, downs, keep = mats
    return FusedMoE(ups, downs, gate.weight.detach(), ffn.router.top_k, route_mode(ffn.router), act_dtype == torch.bfloat16, keep)


def block_step(block: nn.Module, act_dtype: torch.dtype, plain_topk: bool):
    """The feed-forward part of one transformer block at batch 1 as a callable ``h [1, 1, D] →
    [1, 1, D]`` built on the native calls above, or None when the block does not qualify."""
    from moelab.native.build import library

    if library() is None:
        return None
    ffn = block.ffn
    if not block.is_moe:
        step = fused_ffn(ffn, act_dtype)
        return None if step is None else (lambda h: step(h.reshape(-1)).view_as(h))
    moe = fused_moe(ffn, act_dtype) if plain_topk else None
    if moe is None:
        return None
    if ffn.shared is None:
        return lambda h: moe(h.reshape(-1)).view_as(h)
    shared = fused_ffn(ffn.shared, act_dtype)
    if shared is None:
        return lambda h: moe(h.reshape(-1)).view_as(h) + ffn.shared(h)
    return lambda h: (moe(h.reshape(-1)) + shared(h.reshape(-1))).view_as(h)


__all__ = ["block_step", "fused_ffn", "fused_moe", "native_mat", "route_mode"]

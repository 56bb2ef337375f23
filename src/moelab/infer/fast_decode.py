"""Decode fast path: one cached token per row per step with as little work besides the matmuls as possible.

Why: at batch 1 a decode step is a chain of mat-vecs; what decides its speed is the bytes of
weights read and the Python/allocation work around them. :func:`moelab.infer.generate` runs the
model's full ``forward`` every step (mask building, ``past_mask`` concatenation, router losses,
the general dispatch with its ``nonzero``/``index_add``). :class:`FastDecoder` keeps the same
modules and the same arithmetic but:

- a preallocated (static) KV cache, a preallocated key-validity buffer and position tensor,
  updated in place: nothing grows or is concatenated per step;
- no attention mask at all when no row is padded (one query sees every cached key);
- for a single token, the MoE layer runs only the selected experts, indexed with Python ints
  from one ``.tolist()`` of the decision: ``w_up[e]`` is a view, so no expert weight is
  gathered or copied (``W[idx]`` with a tensor ``idx`` copies the chosen experts every token);
  quantized experts (:class:`moelab.quant.experts.QuantExperts`) keep ``forward_expert`` and
  work unchanged. Experts are summed in ascending id order from zero, as the ``loop``
  dispatch does, so fp32 results are bitwise those of the reference. Batched steps use the
  model's own dispatch backend;
- for a single token and a router whose lone-token decision is a softmax top-k (its
  ``decode_spec()``; dropless, eval), the router's own logits and the shared combine weights without
  building a RoutingDecision (other routers go through ``route``, said once in a line);
- no router losses (nothing trains here); ``inference_mode`` for the steps;
- weights prepacked by :func:`cast_for_decode` (:mod:`moelab.infer.packed`: moelab's native
  layouts for bf16/fp32, oneDNN's where the native kernels do not build);
- at batch 1, each half of a block whose weights are in a native layout (fp32, bf16, int8,
  int4) runs as one native call, pre-norm and residual included (:mod:`moelab.infer.fused`):
  the attention half, and the dense FFN or whole MoE block with its router. Those equal the
  modules to rounding, not bitwise; ``fused=False`` keeps the modules;
- at batch > 1, an MoE block's routed experts (after the module's own router) run as one native
  call (:func:`moelab.infer.fused.fused_expert_rows`): each chosen expert's weights read once for
  all its rows, through the kernels the modules' matmuls use for that many rows.

It is one of :func:`moelab.infer.generate`'s decode backends (``decoder=FastDecoder``; the other is the
model's forward, ``ModuleDecoder``): the sampling loop, streaming and cancelling are that function's.
Prefill is the model's own forward into the static cache (one large pass; nothing to gain).
:func:`decode_dtype` picks bf16 where the CPU has native bf16 units. ``torch.compile`` is not
used: eager is the reference and the default (see docs/inference.md, "Fast decode").

Tested equal to :func:`moelab.infer.generate` token for token and to the full forward's logits
(plain fp32 weights: nothing fused), and fused steps against the modules they replace.

Legend: B batch rows, P padded prompt length, M preallocated length, L filled length, D model dim,
V vocab, K top-k assignments of one token.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moelab.errors import UserError
from moelab.hardware import bf16_is_fast
from moelab.infer.fused import attention_step, block_step, fused_expert_rows
from moelab.infer.generate import Completion, SamplingParams, TokenizerLike, generate
from moelab.infer.packed import pack_for_decode
from moelab.model.kv_cache import make_cache
from moelab.model.transformer import Attention, LayerCache
from moelab.moe.routers.base import DecodeSpec, Router, softmax_topk_weights


def decode_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 where the device has native bf16 matrix units (detected), else fp32."""
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def cast_for_decode(model: nn.Module, dtype: torch.dtype, pack: bool = True, backend: str = "auto") -> nn.Module:
    """A copy of ``model`` in ``dtype`` whose RoPE frequencies stay fp32 (positions in bf16 lose
    integer precision past 256). The original is left alone.

    ``pack``: on a CPU, hold the linear and expert weights prepacked (:mod:`moelab.infer.packed`:
    moelab's native layouts for bf16 and fp32, or oneDNN's for bf16 with ``backend="onednn"``;
    2–3× faster mat-vecs here).
    Leave it off for a copy that is to be quantized next (quantization replaces plain linears and experts).
    """
    out = copy.deepcopy(model).to(dtype)
    for router, original in zip(_routers(out), _routers(model)):
        router.float().load_state_dict(original.state_dict())  # router math stays fp32, from the fp32 weights
    if pack and (dtype == torch.bfloat16 or (dtype == torch.float32 and backend != "onednn")):
        pack_for_decode(out, backend=backend)
    return out.eval()


def _routers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Router)]


class FastDecoder:
    """Prefill once, then :meth:`step` one token per row.

    Args:
        model: a causal :class:`moelab.model.transformer.Transformer` (dense or MoE, GQA or MLA,
            full precision or quantized), used as is (cast it first with :func:`cast_for_decode`).
        batch: rows B. max_len: positions M to preallocate (prompt plus new tokens).
        fused: at batch 1, run each feed-forward block whose weights are in a native layout as
            one native call (:mod:`moelab.infer.fused`); False keeps the modules' own path.
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, fused: bool = True) -> None:
        cfg = model.cfg
        if cfg.attention != "causal":
            raise UserError(f"decoding needs a causal model; this one has attention={cfg.attention!r}")
        self.model = model.eval()
        self.cfg = cfg
        self.batch, self.max_len = batch, max_len
        self.device = next(model.parameters()).device
        self.cache = make_cache("static", model, batch, max_len)
        self.specs = [_decode_spec(b.ffn) if b.is_moe else None for b in model.blocks]
        _notice_module_routing(model, self.specs)
        act_dtype = model.embed.weight.dtype
        use_fused = fused and batch == 1 and self.device.type == "cpu"
        self.ffn_steps = [
            block_step(b, act_dtype, spec) if use_fused else None for b, spec in zip(model.blocks, self.specs)
        ]
        self.attn_steps = [attention_step(b, cfg, act_dtype) if use_fused else None for b in model.blocks]
        rows = fused and batch > 1 and self.device.type == "cpu"
        self.expert_rows = [fused_expert_rows(b.ffn.experts, act_dtype) if rows and b.is_moe else None for b in model.blocks]
        self.valid_BM = torch.zeros(batch, max_len, dtype=torch.long, device=self.device)
        self.pos_B1 = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.ones_B1 = torch.ones(batch, 1, dtype=torch.long, device=self.device)
        self.length = 0
        self.padded = False

    @torch.no_grad()
    def prefill(self, ids_BP: Tensor, mask_BP: Tensor | None = None) -> Tensor:
        """Run the (left-padded) prompts; returns the last column's logits ``[B, V]``."""
        P = ids_BP.shape[1]
        if mask_BP is None:
            mask_BP = torch.ones_like(ids_BP)
        if self.max_len < P:
            raise UserError(f"prompt of {P} tokens does not fit the {self.max_len} preallocated positions")
        self.padded = bool((mask_BP == 0).any())
        pos_BP = (mask_BP.cumsum(1) - 1).clamp(min=0)
        logits = self.model(ids_BP, attention_mask=mask_BP, position_ids=pos_BP, cache=self.cache).logits[:, -1]
        self.valid_BM[:, :P] = mask_BP
        self.pos_B1.copy_(pos_BP[:, -1:] + 1)
        self.length = P
        return logits

    @torch.inference_mode()
    def step(self, tokens_B1: Tensor) -> Tensor:
        """One new token per row ``[B, 1]`` → next logits ``[B, V]``."""
        model, cfg = self.model, self.cfg
        L = self.length + 1
        if self.max_len < L:
            raise UserError(f"the static cache holds {self.max_len} positions; step {L} does not fit")
        self.valid_BM[:, L - 1] = 1
        mask = self.valid_BM[:, :L].bool().view(self.batch, 1, 1, L) if self.padded else None
        rope = model.rope(self.pos_B1) if cfg.positions == "rope" else None
        x = model.embed(tokens_B1)
        if cfg.positions == "learned":
            x = x + model.pos_embed(self.pos_B1)
        for i, block in enumerate(model.blocks):
            attn, ffn = self.attn_steps[i], self.ffn_steps[i]  # fused steps update x in place
            if attn is not None and mask is None:
                attn(x, rope, self.cache[i])
            else:
                x = x + _one_query_attention(block, x, rope, mask, self.cache[i])
            if ffn is not None:
                ffn(x)
            else:
                h = block.ffn_norm(x)
                x = x + (self._moe(i, block.ffn, h, tokens_B1) if block.is_moe else block.ffn(h))
        self.length = L
        self.pos_B1 += 1
        return model.lm_head(model.norm(x))[:, -1]

    def _moe(self, layer: int, ffn, h_B1D: Tensor, tokens_B1: Tensor) -> Tensor:
        """The MoE block on one token per row: the model's router (exact same decision), then
        only the chosen experts (batch 1) or the model's dispatch (batched)."""
        B, _, D = h_B1D.shape
        x_TD = h_B1D.reshape(B, D)
        if B > 1:
            decision = ffn.route(x_TD, (B, 1), tokens_B1.reshape(-1), self.ones_B1.reshape(-1).bool())
            rows = self.expert_rows[layer]
            if rows is not None:
                kept = decision.kept
                y_TD = rows(x_TD, decision.token[kept], decision.expert[kept], decision.weight[kept].to(x_TD.dtype))
            else:
                y_TD = ffn.dispatch(x_TD, decision, ffn.experts)
        else:
            spec = self.specs[layer]
            if spec is not None:
                expert_K, weight_1K = _lone_token_choice(ffn.router, spec, x_TD)
                kept_K = [True] * len(expert_K)
            else:
                decision = ffn.route(x_TD, (B, 1), tokens_B1.reshape(-1), self.ones_B1.reshape(-1).bool())
                expert_K, kept_K, weight_1K = decision.expert.tolist(), decision.kept.tolist(), decision.weight
            # Weights as Python numbers already rounded to the activations' dtype: ``out * w``
            # then equals ``out * w_tensor.to(out.dtype)`` bitwise, with no indexing ops.
            weight_K = weight_1K.reshape(-1).to(x_TD.dtype).tolist()
            chosen = sorted((e, a) for a, (e, k) in enumerate(zip(expert_K, kept_K)) if k)
            experts = ffn.experts
            y_TD = None  # 0 + a == a exactly, so starting from the first term keeps loop's sums
            for e, a in chosen:
                term = experts.forward_expert(e, x_TD) * weight_K[a]
                y_TD = term if y_TD is None else y_TD + term
            y_TD = torch.zeros_like(x_TD) if y_TD is None else y_TD.to(x_TD.dtype)
        if ffn.shared is not None:
            y_TD = y_TD + ffn.shared(x_TD)
        return y_TD.view(B, 1, D)


def _one_query_attention(
    block: nn.Module, x_B1D: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: LayerCache
) -> Tensor:
    """The block's attention for one new token per row, with fp32 attention math for bf16 models.

    Why: for a single query, PyTorch's CPU ``scaled_dot_product_attention`` is 4–6× slower in bf16
    than in fp32 (measured on this box, one thread: queries ``[8, 12, 1, 64]`` against 96 cached
    keys 2.0 ms vs 0.40 ms with the casts; 288 keys 3.0 vs 0.46 ms), and at batch 8 it cost more
    than the MoE block. The projections stay the module's (:meth:`Attention.queries_keys_values`,
    :meth:`Attention.output`); only the softmax(q kᵀ) v between them runs on fp32 copies, which is
    also the more exact sum. fp32 models and other attention kinds (MLA) run the module as is.
    """
    attn = block.attn
    h_B1D = block.attn_norm(x_B1D)
    if not isinstance(attn, Attention) or h_B1D.dtype == torch.float32:
        return attn(h_B1D, rope, mask, False, cache)
    q, k, v = attn.queries_keys_values(h_B1D, rope, cache)
    out = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=attn.n_kv_heads != attn.n_heads
    )
    return attn.output(out.to(h_B1D.dtype))


class ModuleRoutingNotice(UserWarning):
    """Some MoE blocks route through their router's forward in fast decoding: slower, same tokens."""


def _notice_module_routing(model: nn.Module, specs: list[DecodeSpec | None]) -> None:
    """One line naming the MoE layers the lone-token step cannot route, and why."""
    why: dict[str, list[int]] = {}
    for i, (block, spec) in enumerate(zip(model.blocks, specs)):
        if block.is_moe and spec is None:
            c = block.ffn.cfg
            capped = c.capacity_factor is not None or c.expert_capacity is not None
            reason = "a capacity limit" if capped else f"{type(block.ffn.router).__name__} (no lone-token softmax top-k)"
            why.setdefault(reason, []).append(i)
    if why:
        parts = "; ".join(f"layers {layers}: {reason}" for reason, layers in why.items())
        warnings.warn(
            f"fast decoding routes through the router's own forward ({parts}): slower, the same tokens",
            ModuleRoutingNotice,
            stacklevel=3,
        )


def _decode_spec(ffn) -> DecodeSpec | None:
    """The block's router's lone-token decision (:meth:`~moelab.moe.routers.base.Router.decode_spec`) when
    nothing else changes it: no capacity (dropless); None otherwise (the router's forward then routes)."""
    c = ffn.cfg
    if c.capacity_factor is not None or c.expert_capacity is not None:
        return None
    return ffn.router.decode_spec()


def _lone_token_choice(router: Router, spec: DecodeSpec, x_1D: Tensor) -> tuple[list[int], Tensor]:
    """Experts and combine weights of one token by ``spec``, through the router's own logits, without
    building a :class:`RoutingDecision` (≈10 µs instead of ≈55 µs)."""
    logits_1E = router.logits(x_1D)
    kept_logits_1K, expert_1K = logits_1E.topk(spec.top_k, dim=-1)
    weight_1K = softmax_topk_weights(kept_logits_1K, expert_1K, logits_1E.softmax(dim=-1), spec.weights)
    return expert_1K[0].tolist(), weight_1K[0]


_DEFAULT_PARAMS = SamplingParams()


@torch.no_grad()
def fast_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = _DEFAULT_PARAMS,
    tokenizer: TokenizerLike | None = None,
    **kw: Any,
) -> list[Completion]:
    """:func:`moelab.infer.generate.generate` with :class:`FastDecoder` as its backend: the same loop,
    arguments (streaming, cancelling, ``on_token`` included) and tokens (greedy exactly; sampling with the
    same per-row generators)."""
    return generate(model, prompts, params, tokenizer, decoder=FastDecoder, **kw)


__all__ = ["FastDecoder", "cast_for_decode", "decode_dtype", "fast_generate"]

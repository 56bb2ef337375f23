"""Python side of the fused batch-1 decode steps in ``decode.c`` and ``attention.c``: a dense
SwiGLU block, an MoE block with its softmax top-k router, or an attention block, in one call.

Each step has a plain form (``step(h) → y``) and a residual form (``step.add_to(x)``: ``x +=
block(rms_norm(x))`` in place, the block's pre-norm included), which is what the decoder runs.

A weight enters as a :class:`Mat`, a C struct pointing at tensor memory in a native layout
(bf16 pairs from :func:`moelab.native.qmatmul.bf16_pack`, or a quantized layer packed for the
native int8/int4 kernels). The struct does not own that memory: :class:`FusedFFN` and
:class:`FusedMoE` keep the tensors alive, and the modules must not be repacked or moved while
they are in use (a decoder builds them for its own lifetime).

Legend: D model dim, F hidden per expert (or dense), E experts, K top-k.
"""

from __future__ import annotations

import contextlib
import ctypes

import torch
from torch import Tensor

from moelab.native.build import library

KIND_BF16, KIND_INT8, KIND_INT4, KIND_F32 = 0, 1, 2, 3
ROUTE_MODES = {"renormalize": 0, "probs": 1, "softmax_after_topk": 2}


class Mat(ctypes.Structure):
    """``moelab_mat_t``: one weight in a native layout."""

    _fields_ = [
        ("kind", ctypes.c_int),
        ("n", ctypes.c_int),
        ("np", ctypes.c_int),
        ("k", ctypes.c_int),
        ("group", ctypes.c_int),
        ("w", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
    ]


def make_mat(kind: int, n: int, k: int, packed: Tensor, scales: Tensor | None = None, group: int = 0) -> Mat:
    """Describe ``packed`` (``[Np, ·]``) as a Mat; the caller keeps the tensors alive."""
    return Mat(kind, n, packed.shape[0], k, group, packed.data_ptr(), 0 if scales is None else scales.data_ptr())


def _check_activation(x: Tensor, d: int, bf16: bool) -> Tensor:
    want = torch.bfloat16 if bf16 else torch.float32
    if x.dtype != want or x.numel() != d or x.device.type != "cpu":
        raise ValueError(f"fused step takes one CPU {want} token of {d} features, got {x.dtype} {tuple(x.shape)}")
    return x.contiguous()


class Norm:
    """An RMSNorm applied inside a residual step: its weight (activation dtype) and eps."""

    def __init__(self, weight: Tensor, eps: float) -> None:
        self.weight, self.eps = weight.detach().contiguous(), float(eps)


def _named(name: str) -> contextlib.AbstractContextManager[object]:
    """The profiler's name for one fused call (``moelab::moe_res``, …): a ``record_function`` while a profiler
    runs, nothing otherwise (it costs ≈6 µs, a tenth of a decode step's MoE block; the check ≈0.06 µs)."""
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def _check_status(rc: int, what: str) -> None:
    if rc == -1:
        raise MemoryError(f"fused {what} step could not allocate its buffers")
    if rc != 0:
        raise ValueError(f"fused {what} step refused its arguments (code {rc})")


class FusedFFN:
    """``y = down(silu(gate) · up)`` for one token through ``moelab_ffn_vec`` (``moelab_ffn_res``
    for :meth:`add_to`)."""

    def __init__(self, up: Mat, down: Mat, bf16: bool, keep: tuple[Tensor, ...], norm: Norm | None = None) -> None:
        self.up, self.down, self.bf16, self._keep, self.norm = up, down, bf16, keep, norm
        self.d = up.k
        self._lib = library()

    def add_to(self, x: Tensor) -> None:
        """``x += ffn(rms_norm(x))`` in place (x: one contiguous token)."""
        _check_activation(x, self.d, self.bf16)
        with _named("moelab::ffn_res"):
            rc = self._lib.moelab_ffn_res(  # type: ignore[union-attr]
                ctypes.byref(self.up), ctypes.byref(self.down), self.norm.weight.data_ptr(), self.norm.eps,  # type: ignore[union-attr]
                x.data_ptr(), int(self.bf16), torch.get_num_threads(),
            )  # fmt: skip
        _check_status(rc, "feed-forward")

    def __call__(self, x: Tensor) -> Tensor:
        x = _check_activation(x, self.d, self.bf16)
        y = torch.empty_like(x)
        with _named("moelab::ffn_vec"):
            rc = self._lib.moelab_ffn_vec(  # type: ignore[union-attr]
                ctypes.byref(self.up), ctypes.byref(self.down), x.data_ptr(), y.data_ptr(), int(self.bf16), torch.get_num_threads()
            )
        _check_status(rc, "feed-forward")
        return y


class FusedMoE:
    """An MoE block for one token through ``moelab_moe_vec``: softmax top-k routing with the
    router's fp32 weight, then the chosen experts; the decision of the last call is kept in
    :attr:`ids` / :attr:`weights` (ascending ids)."""

    def __init__(
        self, ups: list[Mat], downs: list[Mat], router_w_ED: Tensor, top_k: int, mode: str, bf16: bool,
        keep: tuple[Tensor, ...], norm: Norm | None = None, shared: FusedFFN | None = None,
    ) -> None:  # fmt: skip
        E = len(ups)
        if router_w_ED.dtype != torch.float32 or router_w_ED.shape != (E, ups[0].k):
            raise ValueError(f"router weight must be fp32 [{E}, {ups[0].k}], got {router_w_ED.dtype} {tuple(router_w_ED.shape)}")
        if E > 256 or top_k > 64 or top_k > E:
            raise ValueError(f"fused MoE step supports up to 256 experts and top-k 64, got E={E}, k={top_k}")
        self.ups, self.downs = (Mat * E)(*ups), (Mat * E)(*downs)
        self.router_w = router_w_ED.contiguous()
        self.num_experts, self.top_k, self.mode, self.bf16 = E, top_k, ROUTE_MODES[mode], bf16
        self.d = ups[0].k
        self._ids = (ctypes.c_int * top_k)()
        self._weights = (ctypes.c_float * top_k)()
        self._keep = keep
        self.norm, self.shared = norm, shared
        self._lib = library()

    def __call__(self, x: Tensor) -> Tensor:
        x = _check_activation(x, self.d, self.bf16)
        y = torch.empty_like(x)
        with _named("moelab::moe_vec"):
            rc = self._lib.moelab_moe_vec(  # type: ignore[union-attr]
                self.ups, self.downs, self.router_w.data_ptr(), self.num_experts, self.top_k, self.mode,
                x.data_ptr(), y.data_ptr(), self._ids, self._weights, int(self.bf16), torch.get_num_threads(),
            )  # fmt: skip
        _check_status(rc, "MoE")
        return y

    def add_to(self, x: Tensor) -> None:
        """``x += moe(rms_norm(x)) (+ shared(rms_norm(x)))`` in place."""
        _check_activation(x, self.d, self.bf16)
        shared = self.shared
        with _named("moelab::moe_res"):
            rc = self._lib.moelab_moe_res(  # type: ignore[union-attr]
                self.ups, self.downs, self.router_w.data_ptr(), self.num_experts, self.top_k, self.mode,
                None if shared is None else ctypes.byref(shared.up), None if shared is None else ctypes.byref(shared.down),
                self.norm.weight.data_ptr(), self.norm.eps, x.data_ptr(), self._ids, self._weights,  # type: ignore[union-attr]
                int(self.bf16), torch.get_num_threads(),
            )  # fmt: skip
        _check_status(rc, "MoE")

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    @property
    def weights(self) -> list[float]:
        return list(self._weights)


class FusedExpertRows:
    """The routed experts of an MoE block for several tokens through ``moelab_moe_rows``, given the
    routing decision as assignments: each chosen expert's weights are read once for all of its
    rows (batched decode, where a step's tokens share experts)."""

    def __init__(self, ups: list[Mat], downs: list[Mat], bf16: bool, keep: tuple[Tensor, ...]) -> None:
        self.num_experts = len(ups)
        self.ups, self.downs = (Mat * self.num_experts)(*ups), (Mat * self.num_experts)(*downs)
        self.bf16, self._keep = bf16, keep
        self.d = ups[0].k
        self._lib = library()

    def __call__(self, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        """``y_t = Σ_a weight_a · expert_a(x_t)`` over the assignments ``a`` of token t (ascending
        expert), ``[T, D] → [T, D]``; ``weight_A`` holds values of the activation dtype."""
        want = torch.bfloat16 if self.bf16 else torch.float32
        if x_TD.dtype != want or x_TD.dim() != 2 or x_TD.shape[1] != self.d or x_TD.device.type != "cpu":
            raise ValueError(f"fused expert rows take CPU {want} tokens [T, {self.d}], got {x_TD.dtype} {tuple(x_TD.shape)}")
        x_TD = x_TD.contiguous()
        token = token_A.to(torch.int32).contiguous()
        expert = expert_A.to(torch.int32).contiguous()
        weight = weight_A.to(torch.float32).contiguous()
        y = torch.empty_like(x_TD)
        with _named("moelab::moe_rows"):
            rc = self._lib.moelab_moe_rows(  # type: ignore[union-attr]
                self.ups, self.downs, self.num_experts, x_TD.shape[0], token.numel(), token.data_ptr(),
                expert.data_ptr(), weight.data_ptr(), x_TD.data_ptr(), y.data_ptr(), int(self.bf16), torch.get_num_threads(),
            )  # fmt: skip
        _check_status(rc, "expert rows")
        return y


class AttnT(ctypes.Structure):
    """``moelab_attn_t``."""

    _fields_ = [
        ("q", Mat),
        ("k", Mat),
        ("v", Mat),
        ("o", Mat),
        ("norm_w", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("n_heads", ctypes.c_int),
        ("n_kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
    ]


class FusedAttention:
    """``x += o(attention(rope(q), rope(k), v))`` with q, k, v from ``rms_norm(x)``, for one token,
    writing its key and value into a static cache (``[1, G, M, Dh]`` each) at ``pos``."""

    def __init__(
        self, q: Mat, k: Mat, v: Mat, o: Mat, norm: Norm, n_heads: int, n_kv_heads: int, head_dim: int, bf16: bool,
        keep: tuple[Tensor, ...],
    ) -> None:  # fmt: skip
        if head_dim > 1024 or head_dim % 2 or n_heads % n_kv_heads:
            raise ValueError(f"fused attention takes even head_dim <= 1024 and whole groups, got {head_dim}, {n_heads}/{n_kv_heads}")
        self.desc = AttnT(q, k, v, o, norm.weight.data_ptr(), norm.eps, n_heads, n_kv_heads, head_dim)
        self.norm, self.bf16, self._keep = norm, bf16, keep
        self.d, self.n_kv_heads, self.head_dim = q.k, n_kv_heads, head_dim
        self._lib = library()

    def add_to(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> None:
        _check_activation(x, self.d, self.bf16)
        max_len = k_cache.shape[2]
        want = (1, self.n_kv_heads, max_len, self.head_dim)
        if tuple(k_cache.shape) != want or tuple(v_cache.shape) != want or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError(f"fused attention takes contiguous caches {want}, got {tuple(k_cache.shape)}")
        if k_cache.dtype != x.dtype or cos.dtype != torch.float32 or cos.numel() != self.head_dim or not cos.is_contiguous():
            raise ValueError("fused attention takes caches in the activation dtype and contiguous fp32 cos/sin [head_dim]")
        with _named("moelab::attn_res"):
            rc = self._lib.moelab_attn_res(  # type: ignore[union-attr]
                ctypes.byref(self.desc), x.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                max_len, pos, int(self.bf16), torch.get_num_threads(),
            )  # fmt: skip
        _check_status(rc, "attention")

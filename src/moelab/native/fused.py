"""Python side of the fused batch-1 decode steps in ``decode.c``: a dense SwiGLU block, or an MoE
block with its softmax top-k router, in one call.

A weight enters as a :class:`Mat`, a C struct pointing at tensor memory in a native layout
(bf16 pairs from :func:`moelab.native.qmatmul.bf16_pack`, or a quantized layer packed for the
native int8/int4 kernels). The struct does not own that memory: :class:`FusedFFN` and
:class:`FusedMoE` keep the tensors alive, and the modules must not be repacked or moved while
they are in use (a decoder builds them for its own lifetime).

Legend: D model dim, F hidden per expert (or dense), E experts, K top-k.
"""

from __future__ import annotations

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


class FusedFFN:
    """``y = down(silu(gate) · up)`` for one token through ``moelab_ffn_vec``."""

    def __init__(self, up: Mat, down: Mat, bf16: bool, keep: tuple[Tensor, ...]) -> None:
        self.up, self.down, self.bf16, self._keep = up, down, bf16, keep
        self.d = up.k
        self._lib = library()

    def __call__(self, x: Tensor) -> Tensor:
        x = _check_activation(x, self.d, self.bf16)
        y = torch.empty_like(x)
        rc = self._lib.moelab_ffn_vec(  # type: ignore[union-attr]
            ctypes.byref(self.up), ctypes.byref(self.down), x.data_ptr(), y.data_ptr(), int(self.bf16), torch.get_num_threads()
        )
        if rc != 0:
            raise MemoryError("fused feed-forward step could not allocate its buffers")
        return y


class FusedMoE:
    """An MoE block for one token through ``moelab_moe_vec``: softmax top-k routing with the
    router's fp32 weight, then the chosen experts; the decision of the last call is kept in
    :attr:`ids` / :attr:`weights` (ascending ids)."""

    def __init__(
        self, ups: list[Mat], downs: list[Mat], router_w_ED: Tensor, top_k: int, mode: str, bf16: bool,
        keep: tuple[Tensor, ...],
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
        self._lib = library()

    def __call__(self, x: Tensor) -> Tensor:
        x = _check_activation(x, self.d, self.bf16)
        y = torch.empty_like(x)
        rc = self._lib.moelab_moe_vec(  # type: ignore[union-attr]
            self.ups, self.downs, self.router_w.data_ptr(), self.num_experts, self.top_k, self.mode,
            x.data_ptr(), y.data_ptr(), self._ids, self._weights, int(self.bf16), torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("fused MoE step could not allocate its buffers")
        return y

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    @property
    def weights(self) -> list[float]:
        return list(self._weights)

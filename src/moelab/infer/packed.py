"""oneDNN-prepacked weights for CPU decoding: the same linear maps, read faster.

Why: at batch 1 a decode step is a chain of mat-vecs, so its speed is the speed at which the
weights stream through the CPU. ``F.linear`` on a bf16 ``[N, K]`` weight re-reads it in its
plain row-major layout every call, which on the AVX512-BF16 CPUs seen here reaches only about
a third of the memory bandwidth (a 3072×768 mat-vec: ≈410 µs, and ≈14 ms for a 32000×768 LM
head). oneDNN can reorder a weight once into its own blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, the op Inductor's CPU freezing uses) and then
multiply against it 2–3× faster. Decoding never changes weights, so the reorder is paid once.

:func:`pack_for_decode` swaps, in place on a decode copy (see
:func:`moelab.infer.fast_decode.cast_for_decode`), every ``nn.Linear`` outside the routers for a
:class:`PackedLinear` and every :class:`~moelab.moe.experts.Experts` for :class:`PackedExperts`.
Routers stay as they are (fp32 routing decisions must not move). Results equal ``F.linear`` up to
summation order (tested with a tolerance; bf16 only by default, where the gain is).

Where moelab's native kernels build (:mod:`moelab.native`), bf16 weights go to their layout
instead (:class:`NativeLinear`, :class:`NativeExperts`: 16 rows interleaved, two inputs per
32-bit lane, read with the CPU's bf16 dot-product instructions): faster still at batch 1 (a
3072×768 mat-vec ≈90–140 µs against ≈160–180 µs for oneDNN here), and what the fused batch-1
steps of :mod:`moelab.infer.fused` read. ``backend="onednn"`` keeps oneDNN's.

Legend: N output features, K input features, E experts, D model dim, F expert hidden, n rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.errors import UserError
from moelab.model.surgery import set_module, weight_modules
from moelab.moe.experts import Experts, PerExpertModule
from moelab.nn.activations import activate

BACKENDS = ("auto", "native", "onednn")


def packing_available(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether oneDNN prepacking runs here: a CPU build with mkldnn and the ops, bf16 or fp32."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


def _pack(w_NK: Tensor, rows_hint: int) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w_NK.detach().contiguous(), rows_hint)


def _packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """``x [..., K] → [..., N]`` through a prepacked weight; empty inputs never reach oneDNN."""
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:-1], out_features)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is held in oneDNN's blocked layout.

    The packed tensor is an opaque oneDNN tensor held outside parameters and buffers (it has no
    storage to save, move or deep-copy): a packed model is never saved or moved (pack a loaded
    model instead); :func:`packed_bytes` counts its memory.
    """

    def __init__(self, linear: nn.Linear, rows_hint: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _pack(linear.weight, rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        return _packed_linear(x, self.packed, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


class PackedExperts(PerExpertModule):
    """E experts with each expert's ``w_up`` ``[m·F, D]`` and ``w_down`` ``[D, F]`` prepacked.

    Offers the per-expert interface the decode path and the ``loop``/``sorted`` dispatch use
    (``forward_expert``, ``forward``); grouped and padded matmuls need stacked weights, so
    :meth:`grouped_mm_supported` is False and the dispatch takes its per-expert path.
    """

    def __init__(self, experts: Experts, rows_hint: int = 1) -> None:
        super().__init__()
        self.num_experts, self.d_model = experts.num_experts, experts.d_model
        self.hidden, self.activation = experts.hidden, experts.activation
        self.up_rows = experts.w_up.shape[1]
        self._up = [_pack(experts.w_up[e], rows_hint) for e in range(self.num_experts)]
        self._down = [_pack(experts.w_down[e], rows_hint) for e in range(self.num_experts)]

    def forward_expert(self, e: int, x_nD: Tensor) -> Tensor:
        """One expert on its rows: ``[n, D] → [n, D]``."""
        h = _packed_linear(x_nD, self._up[e], None, self.up_rows)
        return _packed_linear(activate(h, self.activation), self._down[e], None, self.d_model)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, packed=oneDNN"


def _native_pack(w_NK: Tensor) -> Tensor:
    from moelab.native.qmatmul import bf16_pack, f32_pack

    return bf16_pack(w_NK) if w_NK.dtype == torch.bfloat16 else f32_pack(w_NK)


class NativeLinear(nn.Module):
    """An inference-only bf16 or fp32 ``nn.Linear`` in moelab's native layout (16 rows
    interleaved; bf16 also pairs two inputs per 32-bit lane: :func:`moelab.native.qmatmul.bf16_pack`).

    Like :class:`PackedLinear`, the packed weight is held outside parameters and buffers: a
    decode copy is never saved or moved.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.packed = _native_pack(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        return _native_linear(x, self.packed, self.bias, self.out_features, self.dtype)

    def extra_repr(self) -> str:
        kind = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=native-{kind}"


def _native_linear(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int, dtype: torch.dtype) -> Tensor:
    from moelab.native.qmatmul import bf16_matmul, f32_matmul

    lead = x.shape[:-1]
    x_MK = x.reshape(-1, x.shape[-1])
    if x_MK.dtype != dtype:
        x_MK = x_MK.to(dtype)
    if not x_MK.is_contiguous():
        x_MK = x_MK.contiguous()
    y = (bf16_matmul if dtype == torch.bfloat16 else f32_matmul)(x_MK, packed, out_features)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*lead, out_features)


class NativeExperts(PerExpertModule):
    """E experts with each expert's ``w_up`` / ``w_down`` in the native layout of their dtype."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        self.num_experts, self.d_model = experts.num_experts, experts.d_model
        self.hidden, self.activation = experts.hidden, experts.activation
        self.up_rows = experts.w_up.shape[1]
        self.dtype = experts.w_up.dtype
        self._up = [_native_pack(experts.w_up[e].detach()) for e in range(self.num_experts)]
        self._down = [_native_pack(experts.w_down[e].detach()) for e in range(self.num_experts)]

    def forward_expert(self, e: int, x_nD: Tensor) -> Tensor:
        """One expert on its rows: ``[n, D] → [n, D]``."""
        h = _native_linear(x_nD, self._up[e], None, self.up_rows, self.dtype)
        return _native_linear(activate(h, self.activation), self._down[e], None, self.d_model, self.dtype)

    def extra_repr(self) -> str:
        kind = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        return f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, packed=native-{kind}"


def module_packed_bytes(mod: nn.Module) -> int:
    """Bytes ``mod`` itself holds in prepacked weights (invisible to ``parameters()`` and ``buffers()``)."""
    if isinstance(mod, (PackedLinear, NativeLinear)):
        tensors = [mod.packed]
    elif isinstance(mod, (PackedExperts, NativeExperts)):
        tensors = mod._up + mod._down
    else:
        return 0
    return sum(t.numel() * t.element_size() for t in tensors)


def packed_bytes(model: nn.Module) -> int:
    """Bytes held in prepacked weights across ``model``."""
    return sum(module_packed_bytes(mod) for mod in model.modules())


def native_available() -> bool:
    from moelab.native.build import library

    return library() is not None


def _native_fits(mod: nn.Module) -> bool:
    """The native layouts need K % 8 == 0 (bf16 pairs, four at a time) for every matrix."""
    if isinstance(mod, Experts):
        return mod.d_model % 8 == 0 and mod.hidden % 8 == 0
    return mod.in_features % 8 == 0  # type: ignore[operator]


def pack_for_decode(model: nn.Module, rows_hint: int = 1, backend: str = "auto") -> int:
    """Replace, in place, every ``nn.Linear`` outside routers and every ``Experts`` by its packed
    form when the weights' dtype can be packed here; returns how many modules were packed.

    ``backend``: ``"native"`` (moelab's bf16 layout; bf16 weights only), ``"onednn"``, or
    ``"auto"``: native for bf16 where it builds and the shapes fit, else oneDNN.
    ``rows_hint`` is the batch oneDNN tunes its layout for (any batch still works).
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown packing backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "native" and not native_available():
        from moelab.native.build import unavailable_reason

        raise UserError(f"moelab's native kernels are unavailable here ({unavailable_reason()}); use backend='onednn'")
    count = 0
    for path, mod in weight_modules(model):
        dtype, device = _weight_dtype_device(mod)
        native = (
            backend != "onednn" and dtype in (torch.bfloat16, torch.float32) and device.type == "cpu"
            and _native_fits(mod) and native_available()
        )  # fmt: skip
        if native:
            new: nn.Module = NativeExperts(mod) if isinstance(mod, Experts) else NativeLinear(mod)  # type: ignore[arg-type]
        elif backend != "native" and packing_available(dtype, device) and (dtype == torch.bfloat16 or backend == "onednn"):
            new = PackedExperts(mod, rows_hint) if isinstance(mod, Experts) else PackedLinear(mod, rows_hint)  # type: ignore[arg-type]
        else:
            continue
        set_module(model, path, new)
        count += 1
    return count


def _weight_dtype_device(mod: nn.Module) -> tuple[torch.dtype, torch.device]:
    weight = mod.w_up if isinstance(mod, Experts) else mod.weight
    return weight.dtype, weight.device


__all__ = [
    "NativeExperts",
    "NativeLinear",
    "PackedExperts",
    "PackedLinear",
    "pack_for_decode",
    "packed_bytes",
    "packing_available",
]

"""One FFN layer: MoE (every dispatch backend) vs its iso-active dense twin vs transformers' Mixtral.

In bf16 the MoE and the twin run twice: under autocast with fp32 weights (training with fp32
master weights: every step casts all E experts' weights, 8× the twin's at E64k8) and with the
weights stored in bf16 (suffix ``:lowp-weights``; no casts, as inference and transformers' block
run). Each ``:lowp-weights`` candidate and transformers' block is compared with the
``dense:lowp-weights`` twin, the others with the autocast twin.

Each candidate runs forward (no grad) and forward+backward (``(y·g).sum()`` with a fixed
random ``g``: a dense gradient, as in training) on the same input; times are interleaved
medians and reported as ratios to the dense twin. Achieved GFLOP/s counts the active FFN
FLOPs (``6·T·D·K·F`` forward, 3× that for forward+backward; router excluded) and is set
against the machine's dense matmul rate measured in the same run.

Legend: T tokens, D model dim, E experts, K top-k, F expert hidden.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from moelab.benchmarks.hf_mixtral import HF_IMPLEMENTATIONS, mixtral_block_like
from moelab.benchmarks.timing import cuda_peak_bytes, interleaved, saved_for_backward_bytes
from moelab.config import MoEConfig
from moelab.moe.dispatch import DISPATCHERS
from moelab.moe.layer import MoELayer
from moelab.nn.ffn import DenseMLP


@dataclass(frozen=True)
class LayerShape:
    num_experts: int
    top_k: int
    expert_hidden: int
    d_model: int = 512
    tokens: int = 4096

    @property
    def name(self) -> str:
        return f"E{self.num_experts}k{self.top_k}/h{self.expert_hidden}"

    def active_flops_forward(self) -> int:
        """SwiGLU FFN FLOPs of the active experts (= the iso-active dense twin), router excluded."""
        return 6 * self.tokens * self.d_model * self.top_k * self.expert_hidden


WEIGHTS_SUFFIX = ":lowp-weights"  # candidates whose weights are stored in the low-precision dtype


def ratio_base(name: str, names: set[str] | dict) -> str:
    """The dense twin a candidate is compared with: the low-precision-weight twin for candidates
    that run with low-precision weights (ours and transformers'), else the autocast twin."""
    low = f"dense{WEIGHTS_SUFFIX}"
    if low in names and (name.endswith(WEIGHTS_SUFFIX) or name.startswith("hf:")):
        return low
    return "dense"


def autocast_for(dtype: torch.dtype, device: torch.device):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _clear_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def layer_candidates(
    shape: LayerShape,
    dtype: torch.dtype,
    device: torch.device,
    backends: list[str],
    hf: bool,
    seed: int = 0,
    hf_impls: tuple[str, ...] = HF_IMPLEMENTATIONS,
) -> dict[str, tuple[Callable[[Tensor], Tensor], nn.Module, bool]]:
    """name → (forward fn on ``x_BSD``, module, runs under autocast). Same weights throughout."""
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=shape.num_experts, top_k=shape.top_k, expert_hidden=shape.expert_hidden)
    moe = MoELayer(shape.d_model, cfg, "swiglu").to(device)
    dense = DenseMLP(shape.d_model, shape.top_k * shape.expert_hidden, "swiglu").to(device)
    out: dict[str, tuple[Callable[[Tensor], Tensor], nn.Module, bool]] = {"dense": (dense, dense, True)}
    for name in backends:
        fn = DISPATCHERS[name]

        def run_moe(x: Tensor, fn=fn) -> Tensor:
            B, S, D = x.shape
            x_TD = x.reshape(B * S, D)
            return fn(x_TD, moe.route(x_TD, (B, S), None, None), moe.experts)

        out[f"moe:{name}"] = (run_moe, moe, True)
    if dtype != torch.float32:
        # The same weights stored in ``dtype`` and run without autocast: no per-step weight
        # casts, as transformers' block runs in bf16 (its comparison uses these) and as
        # inference or bf16-parameter training would.
        suffix = WEIGHTS_SUFFIX
        dense_w, moe_w = copy.deepcopy(dense).to(dtype), copy.deepcopy(moe).to(dtype)

        def run_moe_w(x: Tensor, fn=DISPATCHERS["auto"]) -> Tensor:
            B, S, D = x.shape
            x_TD = x.reshape(B * S, D)
            return fn(x_TD, moe_w.route(x_TD, (B, S), None, None), moe_w.experts)

        out[f"dense{suffix}"] = (dense_w, dense_w, False)
        out[f"moe:auto{suffix}"] = (run_moe_w, moe_w, False)
    if hf:
        hf_dtype = dtype if dtype != torch.float32 else torch.float32
        for impl in hf_impls:
            block = mixtral_block_like(moe, impl, hf_dtype)
            if block is not None:
                out[f"hf:{impl}"] = (block, block, False)
    return out


def bench_layer(
    shape: LayerShape,
    dtype: torch.dtype,
    device: torch.device,
    backends: list[str],
    repeats: int,
    hf: bool = True,
    forward_only_too: bool = True,
    hf_impls: tuple[str, ...] = HF_IMPLEMENTATIONS,
) -> dict[str, object]:
    """Times, ratios to dense, GFLOP/s and memory of every candidate on one shape and dtype."""
    cands = layer_candidates(shape, dtype, device, backends, hf, hf_impls=hf_impls)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x32 = torch.randn(1, shape.tokens, shape.d_model, generator=gen).to(device)
    g32 = torch.randn(1, shape.tokens, shape.d_model, generator=gen).to(device)

    def inputs(native: bool) -> tuple[Tensor, Tensor]:
        # Autocast candidates keep fp32 inputs; transformers' block runs natively in ``dtype``.
        return (x32, g32) if native else (x32.to(dtype), g32.to(dtype))

    def fwd_bwd(fn, module, native) -> Callable[[], Tensor]:
        x0, g = inputs(native)

        def step() -> Tensor:
            _clear_grads(module)
            x = x0.detach().requires_grad_()
            with autocast_for(dtype, device) if native else contextlib.nullcontext():
                y = fn(x)
                y = y.y if hasattr(y, "y") else y
            (y.float() * g).sum().backward()
            return y

        return step

    def fwd(fn, module, native) -> Callable[[], Tensor]:
        x0, _ = inputs(native)

        def step() -> Tensor:
            with torch.no_grad(), autocast_for(dtype, device) if native else contextlib.nullcontext():
                return fn(x0)

        return step

    errors: dict[str, str] = {}
    fb_fns, f_fns, memory = {}, {}, {}
    for name, (fn, module, native) in cands.items():
        step = fwd_bwd(fn, module, native)
        try:
            step()
        except Exception as exc:  # a candidate this torch/transformers cannot run: report, go on
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        fb_fns[name] = step
        f_fns[name] = fwd(fn, module, native)
        x0, _ = inputs(native)

        def forward_with_grad(fn=fn, module=module, native=native, x0=x0) -> Tensor:
            x = x0.detach().requires_grad_()
            with autocast_for(dtype, device) if native else contextlib.nullcontext():
                return fn(x)

        memory[name] = {
            "saved_for_backward_MB": saved_for_backward_bytes(forward_with_grad, module.parameters()) / 2**20,
            "cuda_peak_MB": (lambda b: None if b is None else b / 2**20)(cuda_peak_bytes(step, device)),
        }
    fb = interleaved(fb_fns, repeats=repeats, warmup=0, device=device)  # each step ran once above
    f = interleaved(f_fns, repeats=repeats, device=device) if forward_only_too else {}
    flops_fb = 3 * shape.active_flops_forward()
    rows = {}
    for name in fb:
        base = ratio_base(name, fb)
        rows[name] = {
            "fwdbwd_s": fb[name],
            "fwdbwd_vs_dense": fb[name] / fb[base],
            "vs": base,
            "fwdbwd_gflops": flops_fb / fb[name] / 1e9,
            **({"fwd_s": f[name], "fwd_vs_dense": f[name] / f[base]} if name in f and base in f else {}),
            **memory[name],
        }
    return {
        "shape": asdict(shape),
        "name": shape.name,
        "dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
        "errors": errors,
    }

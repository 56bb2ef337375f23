"""Put the bench sections together: what ``moelab bench`` runs, quick or full.

Quick (``--quick``, under 2 minutes on 2 idle CPU cores): both issue shapes at T=512,
forward+backward only, 2 rounds, fp32 and bf16, every backend (``loop`` at E=8 only) and
transformers' Mixtral block, the ``tiny`` preset's training step. Full: T=4096 with forward-only too, a sweep over E at fixed
active FLOPs (k=2, h=1024), ``tiny`` and ``small`` training steps, and ``--skew``. In bf16 each training step
runs twice: autocast over fp32 weights, and bf16 weights with fp32 masters (dtype ``bf16-master``).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moelab import hardware
from moelab.benchmarks.layer import LayerShape, bench_layer
from moelab.benchmarks.model import bench_model
from moelab.benchmarks.skew import bench_skew
from moelab.benchmarks.timing import matmul_gflops
from moelab.moe.dispatch import DISPATCHERS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ISSUE_SHAPES = ((8, 2, 1024), (64, 8, 256))  # (E, K, F) at D=512: coarse and fine-grained
SWEEP_EXPERTS = (4, 8, 16, 32, 64)  # k=2, F=1024: the same active FLOPs, more total parameters
SKEWS = (0.0, 1.0, 2.0, 4.0)
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU name, for MFU; None where unknown.
GPU_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def gpu_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in name), None)


@dataclass(frozen=True)
class BenchOptions:
    quick: bool = False
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    tokens: int | None = None  # default: 512 quick, 4096 full
    d_model: int = 512
    repeats: int | None = None  # default: 2 quick, 5 full
    backends: tuple[str, ...] = field(default_factory=lambda: tuple(DISPATCHERS))
    hf: bool = True
    hf_impls: tuple[str, ...] = ("eager", "grouped_mm")
    model: bool = True
    sweep: bool | None = None  # default: full only
    skew: bool = False
    device: str = "cpu"

    @property
    def n_tokens(self) -> int:
        return self.tokens or (512 if self.quick else 4096)

    @property
    def n_repeats(self) -> int:
        return self.repeats or (2 if self.quick else 5)


def layer_backends(opts: BenchOptions, num_experts: int) -> list[str]:
    """Backends for one shape: all asked for, except ``loop`` beyond E=8 in quick runs (at E=64
    the reference loop alone would take most of the 2-minute budget; the full run keeps it)."""
    if opts.quick and num_experts > 8:
        return [b for b in opts.backends if b != "loop"]
    return list(opts.backends)


def run_bench(opts: BenchOptions, log: Callable[[str], None] = print) -> dict[str, object]:
    """Run the sections ``opts`` asks for and return one JSON-ready record."""
    device = torch.device(opts.device)
    dtypes = {name: DTYPES[name] for name in opts.dtypes}
    result: dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": hardware.describe(device),
        "options": {**opts.__dict__, "tokens": opts.n_tokens, "repeats": opts.n_repeats},
    }
    log(f"machine: {result['machine']}")
    result["matmul_gflops"] = {name: matmul_gflops(dt, device) for name, dt in dtypes.items()}
    log(f"dense matmul GFLOP/s: {result['matmul_gflops']}")

    layers = []
    for E, K, F in ISSUE_SHAPES:
        shape = LayerShape(E, K, F, opts.d_model, opts.n_tokens)
        for name, dt in dtypes.items():
            log(f"layer {shape.name} {name}")
            layers.append(
                bench_layer(
                    shape,
                    dt,
                    device,
                    layer_backends(opts, E),
                    opts.n_repeats,
                    opts.hf,
                    not opts.quick,
                    opts.hf_impls,
                )
            )
    result["layer"] = layers
    peak = gpu_peak_tflops(device)
    if peak is not None:  # MFU of the dense twin and of every MoE candidate, bf16 peak
        result["gpu_peak_bf16_tflops"] = peak
        for rec in layers:
            for row in rec["rows"].values():
                row["mfu"] = row["fwdbwd_gflops"] / (peak * 1e3)

    if opts.sweep if opts.sweep is not None else not opts.quick:
        sweep = []
        backends = [b for b in ("sorted", "grouped_mm", "padded", "auto") if b in opts.backends]
        for E in SWEEP_EXPERTS:
            shape = LayerShape(E, 2, 1024, opts.d_model, opts.n_tokens)
            for name, dt in dtypes.items():
                log(f"sweep {shape.name} {name}")
                sweep.append(
                    bench_layer(shape, dt, device, backends, opts.n_repeats, hf=False, forward_only_too=False)
                )
        result["sweep"] = sweep

    if opts.skew:
        shape = LayerShape(*ISSUE_SHAPES[0], opts.d_model, opts.n_tokens)
        skew_backends = [b for b in ("sorted", "padded", "auto") if b in opts.backends]
        result["skew"] = {}
        for name, dt in dtypes.items():
            log(f"skew {shape.name} {name}")
            skews = list(SKEWS[:2] if opts.quick else SKEWS)
            result["skew"][name] = {
                "shape": shape.name,
                "rows": bench_skew(shape, dt, device, skews, skew_backends, opts.n_repeats),
            }

    if opts.model:
        runs = [("tiny", 4, 128)] if opts.quick else [("tiny", 8, 256), ("small", 2, 1024)]
        models = []
        for preset_name, batch, seq in runs:
            for name, dt in dtypes.items():
                log(f"model {preset_name} {name}")
                models.append(bench_model(preset_name, batch, seq, dt, device, opts.n_repeats))
                if dt == torch.bfloat16:  # beside autocast: bf16 weights, AdamW over fp32 masters
                    log(f"model {preset_name} bf16-master")
                    models.append(bench_model(preset_name, batch, seq, dt, device, opts.n_repeats, master=True))
        result["model"] = models
    return result

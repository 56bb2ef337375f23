"""Micro-benchmark: batch-1 mat-vec through every weight format and kernel moelab has, on this CPU.

    python benchmarks/quant_matvec.py [--threads 2] [--rows 1] [--json out.json]

Shapes are one expert of the Mixtral-shaped default of issue 13 (d_model 768, expert hidden
1536): the fused gate+up matrix ``[3072, 768]`` and the down matrix ``[768, 1536]``, plus the LM
head ``[32000, 768]``. Each variant cycles through enough distinct copies of its weight (≥ 256 MB)
that every call reads from memory, as a decode step does, not from cache. Variants are timed in
the same process, interleaved over rounds, as ratios to bf16 ``F.linear``; the table shows the
fastest round of each (the least disturbed on a shared machine), the JSON the medians too.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moelab.infer.packed import NativeLinear, PackedLinear, native_available
from moelab.quant import QuantLinear, kernels

SHAPES = {"expert up [3072, 768]": (3072, 768), "expert down [768, 1536]": (768, 1536), "lm head [32000, 768]": (32000, 768)}
STREAM_BYTES = 256 * 2**20


def _quantized(w: torch.Tensor, bits: int, group: int, kernel_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    mod = QuantLinear.from_weight(w, bits, group).to(torch.bfloat16)
    kernel = kernels.kernel_named(kernel_name)
    packed = kernel.pack(mod.plain_qweight())
    scales = mod.scales if bits == 8 else mod.scales_zeros
    return lambda x: kernels.matmul(kernel, x, packed, scales, mod.out_features, group)


def variants_for(n: int, k: int, copies: int) -> dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]:
    """Every variant as ``copies`` callables on distinct weights (x is passed in: bf16, or fp32 for fp32 rows)."""
    out: dict[str, list] = {}
    for _ in range(copies):
        w = torch.randn(n, k) * k**-0.5
        lin16 = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        lin16.weight.data.copy_(w)
        lin32 = nn.Linear(k, n, bias=False)
        lin32.weight.data.copy_(w)
        w16 = w.bfloat16()
        row = {
            "bf16 F.linear": lambda x, w16=w16: F.linear(x, w16),
            "bf16 oneDNN packed": PackedLinear(lin16),
            "fp32 F.linear": lambda x, w=w: F.linear(x.float(), w),
            "int8 PyTorch": _quantized(w, 8, 32, "aten-int8"),
            "int4 g32 PyTorch": _quantized(w, 4, 32, "aten-int4-cpu"),
        }
        if native_available():
            row |= {
                "bf16 native": NativeLinear(lin16),
                "fp32 native": NativeLinear(lin32),
                "int8 native": _quantized(w, 8, 32, "native-int8"),
                "int4 g32 native": _quantized(w, 4, 32, "native-int4"),
                "int4 g128 native": _quantized(w, 4, 128, "native-int4"),
            }
        for name, fn in row.items():
            out.setdefault(name, []).append(fn)
    return out


def _time(fns: list, x: torch.Tensor) -> float:
    t = time.perf_counter()
    for fn in fns:
        fn(x)
    return (time.perf_counter() - t) / len(fns)


def bench(rows: int, rounds: int) -> list[dict]:
    out = []
    for name, (n, k) in SHAPES.items():
        copies = max(2, math.ceil(STREAM_BYTES / (n * k * 2)))
        x16 = torch.randn(rows, k).bfloat16()
        with torch.no_grad():
            variants = variants_for(n, k, copies)
            for fns in variants.values():  # warm up
                _time(fns[:2], x16)
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(rounds):
                for v, fns in variants.items():
                    times[v].append(_time(fns, x16.float() if v.startswith("fp32") else x16))
            del variants
        base, base_med = min(times["bf16 F.linear"]), statistics.median(times["bf16 F.linear"])
        for v, ts in times.items():
            best, med = min(ts), statistics.median(ts)
            out.append({
                "shape": name, "variant": v, "us": best * 1e6, "speedup_vs_bf16": base / best,
                "us_median": med * 1e6, "speedup_vs_bf16_median": base_med / med,
            })  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=1, help="rows of x (1 = batch-1 decode)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = bench(args.rows, args.rounds)
    print(f"torch {torch.__version__}, {args.threads} thread(s), x rows {args.rows}")
    print("| matrix | variant | µs / call (best round) | vs bf16 F.linear | vs bf16, medians |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['variant']} | {r['us']:.0f} | {r['speedup_vs_bf16']:.2f}× "
            f"| {r['speedup_vs_bf16_median']:.2f}× |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows_x": args.rows, "results": rows}, indent=1))


if __name__ == "__main__":
    main()

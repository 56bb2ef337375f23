"""Micro-benchmark: weight-only quantized mat-vec (batch 1) against bf16 ``F.linear`` on this CPU.

    python benchmarks/quant_matvec.py [--threads 1] [--rows 1] [--json out.json]

Shapes are one expert of the Mixtral-shaped default of issue 13 (d_model 768, expert hidden
1536): the fused gate+up matrix ``[3072, 768]`` and the down matrix ``[768, 1536]``, plus an
LM head slice ``[32000, 768]``. Every variant is timed in the same process, interleaved over
many short rounds, and reported as a ratio to bf16 ``F.linear``. On a shared, busy machine a round
is often preempted, so the table uses the *fastest* round of each variant (the least disturbed
one; the median is in the JSON): absolute times move 20–40% between runs, the ratios less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from moelab.quant import QuantLinear

SHAPES = {"expert up [3072, 768]": (3072, 768), "expert down [768, 1536]": (768, 1536), "lm head [32000, 768]": (32000, 768)}


def _time(fn: Callable[[], object], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def bench(rows: int, rounds: int, calls: int) -> list[dict]:
    out = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * k**-0.5
        x32 = torch.randn(rows, k)
        x16 = x32.bfloat16()
        w16 = w.bfloat16()
        variants: dict[str, Callable[[], object]] = {
            "bf16 F.linear": lambda x16=x16, w16=w16: F.linear(x16, w16),
            "fp32 F.linear": lambda x32=x32, w=w: F.linear(x32, w),
        }
        for label, bits, group in (("int8", 8, 32), ("int4 g32", 4, 32), ("int4 g64", 4, 64), ("int4 g128", 4, 128)):
            mod = QuantLinear.from_weight(w, bits, group).to(torch.bfloat16)
            variants[f"{label} (bf16 act)"] = lambda mod=mod, x16=x16: mod(x16)
        with torch.no_grad():
            for fn in variants.values():  # warm up (int4 packs on first call)
                _time(fn, 3)
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(rounds):
                for v, fn in variants.items():
                    times[v].append(_time(fn, calls))
        base, base_med = min(times["bf16 F.linear"]), statistics.median(times["bf16 F.linear"])
        for v, ts in times.items():
            best, med = min(ts), statistics.median(ts)
            out.append(
                {
                    "shape": name,
                    "variant": v,
                    "us": best * 1e6,
                    "speedup_vs_bf16": base / best,
                    "us_median": med * 1e6,
                    "speedup_vs_bf16_median": base_med / med,
                }
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=1, help="rows of x (1 = batch-1 decode)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = bench(args.rows, args.rounds, args.calls)
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

"""Peak RAM while recording a routing trace: 1M tokens × 4 MoE layers must stay under 200 MB.

Runs a tiny 4-layer MoE model (E=8, k=2) over random token ids and streams its routing to a
trace folder with :class:`moelab.analysis.TraceWriter`. The peak resident set size is read from
``/proc/self/status`` (VmHWM, reset just before recording through ``/proc/self/clear_refs``), so
the number is the process's peak *while recording*; the increase over the RSS before recording
is what recording costs (torch and the model, ~250 MB on CPU, are resident either way) and is
what the 200 MB budget applies to. It includes the model's own activations for one batch.

    python benchmarks/trace_memory.py [--tokens 1000000] [--out /tmp/trace-bench] [--json result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moelab.analysis import Trace, TraceWriter
from moelab.config import ModelConfig, MoEConfig
from moelab.model.transformer import Transformer


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--out", default=None, help="trace folder (default: a temporary one, removed afterwards)")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    cfg = ModelConfig(vocab_size=2048, d_model=32, n_layers=args.layers, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      max_seq_len=args.seq, moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=16))
    model = Transformer(cfg).eval()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="moelab-trace-bench-"))
    n_batches = -(-args.tokens // (args.batch * args.seq))
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    with torch.no_grad():
        model(ids, return_routing=True)  # warm-up: allocator and kernels before the baseline
    before_kb = _status_kb("VmRSS")
    exact_peak = _reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad(), TraceWriter(out / "trace") as tw:
        for _ in range(n_batches):
            ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
            tw.record(model(ids, return_routing=True).routing, ids)
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if exact_peak else _status_kb("VmRSS")
    trace = Trace.load(out / "trace")
    disk = sum(f.stat().st_size for f in (out / "trace").iterdir())
    result = {
        "tokens": trace.num_tokens,
        "layers": len(trace.layers),
        "rss_before_mb": round(before_kb / 1024, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_increase_mb": round((peak_kb - before_kb) / 1024, 1),
        "peak_is_exact": exact_peak,
        "trace_on_disk_mb": round(disk / 2**20, 1),
        "seconds": round(seconds, 1),
        "tokens_per_second": round(trace.num_tokens / seconds),
    }
    print(json.dumps(result, indent=1))
    # the budget is for what recording costs: torch and the model are resident before it starts
    verdict = "under" if result["peak_increase_mb"] < 200 else "OVER"
    print(f"recording {result['tokens']:,} tokens x {result['layers']} layers: peak RSS {result['peak_rss_mb']} MB, "
          f"+{result['peak_increase_mb']} MB over the {result['rss_before_mb']} MB before recording "
          f"({verdict} the 200 MB budget)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Where one MoE layer's forward+backward spends its time: top operators by self CPU/CUDA time.

    python benchmarks/profile_dispatch.py --backend auto --experts 64 --top-k 8 --hidden 256 --dtype bf16
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from moelab.benchmarks.layer import WEIGHTS_SUFFIX, LayerShape, autocast_for, layer_candidates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="auto", help="dispatch backend, or 'dense' for the twin")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--lowp-weights", action="store_true", help="bf16-stored weights, no autocast (no weight casts)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shape = LayerShape(args.experts, args.top_k, args.hidden, args.d_model, args.tokens)
    key = "dense" if args.backend == "dense" else f"moe:{args.backend}"
    low = args.lowp_weights and dtype != torch.float32
    if low:
        if args.backend not in ("dense", "auto"):
            p.error("--lowp-weights profiles the dense twin or the auto backend")
        key += WEIGHTS_SUFFIX
    fn, module, _ = layer_candidates(shape, dtype, device, [] if key.startswith("dense") else [args.backend], hf=False)[key]
    x0 = torch.randn(1, shape.tokens, shape.d_model, device=device)
    if low:
        x0 = x0.to(dtype)
    g = torch.randn_like(x0)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x = x0.detach().requires_grad_()
        with autocast_for(torch.float32 if low else dtype, device):
            y = fn(x)
        (y.float().reshape_as(g) * g).sum().backward()

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{key} {shape.name} {args.dtype}")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()

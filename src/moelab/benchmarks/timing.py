"""Interleaved timing and activation-memory measurement.

Why interleaved: on a shared machine absolute times drift ±15% between runs; running every
candidate once per round, in rotating order, and taking the median per candidate makes the
ratios between candidates (what the bench reports) far steadier than the absolute times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: torch.device | None = None
) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds, each round running all of them."""
    device = device or torch.device("cpu")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def saved_for_backward_bytes(fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of distinct tensor storage autograd keeps for the backward of ``fn()``, parameters excluded.

    The activation memory a training step holds per layer: the part of peak memory dispatch
    choices change (parameters and their gradients are the same for every backend; bf16 copies
    of weights made by autocast do count). Works on CPU, where torch has no peak counter.
    """
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated during ``fn()`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def matmul_gflops(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """The machine's dense matmul rate in this run: ``[4096, 512] @ [512, 2048]`` in ``dtype``."""
    m, k, n = 4096, 512, 2048
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    t = interleaved({"mm": lambda: a @ b}, repeats=repeats, warmup=2, device=device)["mm"]
    return 2 * m * k * n / t / 1e9

"""What the machine can do fast: detected, never assumed.

Why: on CPUs with native bf16 matrix units (AVX512-BF16, AMX) bf16 matmuls run 4.5–7× faster
than fp32 (shared/PERFORMANCE-NOTES.md), so bf16 autocast is the fast training path there;
on other CPUs it is slower than fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 autocast should be the default on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def describe(device: torch.device | str = "cpu") -> dict[str, object]:
    """A small record for logs and benchmark JSON."""
    device = torch.device(device)
    info: dict[str, object] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16_fast": bf16_is_fast(device),
    }
    if device.type == "cpu":
        info["cpu_bf16_units"] = cpu_has_bf16()
    elif torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info

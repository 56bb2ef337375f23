"""What the machine can do fast: detected, never assumed.

Why: on CPUs with native bf16 matrix units (AVX512-BF16, AMX) bf16 matmuls run 4.5–7× faster
than fp32 (shared/PERFORMANCE-NOTES.md), so bf16 autocast is the fast training path there;
on other CPUs it is slower than fp32. And how much memory is free, so a model too big for the
machine is refused before it is allocated (``moelab.model.memory_guard``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from dataclasses import dataclass
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


def measure_read_bandwidth(
    gib: float = 1.0, repeats: int = 3, statistic: str = "best", dtype: torch.dtype = torch.bfloat16
) -> float:
    """Memory read bandwidth in GB/s from ``repeats`` sums over a ``gib`` GiB tensor of ``dtype`` (far
    larger than the caches), with torch's threads. A sum reads each byte once and computes little, so it
    runs at the rate memory gives this process now (here it moves between ≈33 and ≈56 GB/s from minute
    to minute: measure beside the figure it bounds, not once per machine).

    ``statistic``: ``"best"`` (the fastest pass: what the memory can give; bench-decode's bound) or
    ``"median"`` (the typical pass: on this VM single passes came out both well below and well above the
    steady rate; the hybrid-inference study's and the speculative benchmark's)."""
    if statistic not in ("best", "median"):
        raise ValueError(f"statistic must be 'best' or 'median', got {statistic!r}")
    x = torch.ones(int(gib * 2**30) // (torch.finfo(dtype).bits // 8), dtype=dtype)
    x.sum()  # first touch
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    seconds = min(times) if statistic == "best" else statistics.median(times)
    return x.numel() * x.element_size() / seconds / 1e9


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


@dataclass(frozen=True)
class AvailableMemory:
    """Bytes a new allocation can take on a device, and where the number comes from (for messages)."""

    bytes: int
    source: str


def _meminfo_available(text: str) -> int | None:
    """``MemAvailable`` of a /proc/meminfo text, in bytes (the kernel's estimate of what can be
    allocated without swapping: free memory plus reclaimable caches)."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            return int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return None


def _cgroup_stat(text: str, key: str) -> int:
    """One counter of a cgroup ``memory.stat`` text (0 when absent)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def cgroup_room(limit: str, usage: int, stat: str, inactive_key: str) -> int | None:
    """Bytes left under a cgroup memory limit, or None without one (``max``, or v1's ~2⁶³).

    Usage counts the page cache; its inactive file pages are reclaimed before the cgroup runs out
    (what ``docker stats`` calls the working set), so they count as room, as MemAvailable does."""
    if not limit.isdigit() or int(limit) >= 1 << 60:
        return None
    return max(0, int(limit) - (usage - _cgroup_stat(stat, inactive_key)))


@functools.cache
def _cgroup_files() -> tuple[Path, str] | None:
    """This process's cgroup memory folder and its inactive-cache key (v2, then v1), or None.
    Looked up once: whether a cgroup limits memory does not change while a process runs."""
    for root, limit_file, inactive_key in (
        (Path("/sys/fs/cgroup"), "memory.max", "inactive_file"),
        (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "total_inactive_file"),
    ):
        if (root / limit_file).is_file():
            return root, inactive_key
    return None


def _cgroup_room() -> int | None:
    """Room under this process's cgroup memory limit, or None: a container's MemAvailable shows
    the host's memory, while the cgroup kills the process at its own limit."""
    found = _cgroup_files()
    if found is None:
        return None
    root, inactive_key = found
    v2 = inactive_key == "inactive_file"
    try:
        limit = (root / ("memory.max" if v2 else "memory.limit_in_bytes")).read_text().strip()
        if cgroup_room(limit, 0, "", inactive_key) is None:
            return None  # no limit: usage and statistics are not needed
        usage = int((root / ("memory.current" if v2 else "memory.usage_in_bytes")).read_text().strip())
        stat = (root / "memory.stat").read_text()
    except (OSError, ValueError):
        return None
    return cgroup_room(limit, usage, stat, inactive_key)


def _os_available() -> AvailableMemory | None:
    """Available CPU memory as the OS reports it: MemAvailable (Linux), else available pages
    (``sysconf``, other Unixes), else psutil where it is installed (macOS, Windows)."""
    with contextlib.suppress(OSError):
        avail = _meminfo_available(Path("/proc/meminfo").read_text())
        if avail is not None:
            return AvailableMemory(avail, "MemAvailable in /proc/meminfo")
    with contextlib.suppress(AttributeError, OSError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return AvailableMemory(pages, "available pages (sysconf)")
    try:
        import psutil
    except ImportError:
        return None
    return AvailableMemory(int(psutil.virtual_memory().available), "available memory (psutil)")


def available_memory(device: torch.device | str = "cpu") -> AvailableMemory | None:
    """Memory free for new tensors on ``device``, or None where it cannot be known (then callers
    skip size checks rather than guess).

    CPU: ``MemAvailable`` from /proc/meminfo, bounded by the cgroup limit where one is set;
    elsewhere the OS's count of available pages (``sysconf``), else psutil when installed.
    CUDA: the driver's free memory (``torch.cuda.mem_get_info``). Meta tensors take no memory.
    """
    try:
        device = torch.device(device)
    except RuntimeError:  # not a device name: whoever uses the device reports it
        return None
    if device.type == "meta":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(device)
        return AvailableMemory(int(free), f"free memory of {device}")
    if device.type != "cpu":
        return None
    found = _os_available()
    if found is None:
        return None
    room = _cgroup_room()
    if room is not None and room < found.bytes:
        return AvailableMemory(room, "room under the cgroup memory limit")
    return found

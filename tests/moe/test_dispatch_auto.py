"""``auto`` picks by device, dtype and shape; the rules follow docs/performance.md."""

from __future__ import annotations

import torch

from moelab.moe.dispatch.auto import MANY_EXPERTS, choose_backend
from moelab.moe.experts import Experts, compute_dtype

CPU = torch.device("cpu")


def test_cpu_fp32_uses_sorted_slices() -> None:
    assert choose_backend(CPU, torch.float32, Experts(64, 32, 16, "swiglu")) == "sorted"


def test_cpu_bf16_uses_grouped_mm_only_for_many_experts() -> None:
    assert choose_backend(CPU, torch.bfloat16, Experts(MANY_EXPERTS, 32, 16, "swiglu")) == "grouped_mm"
    assert choose_backend(CPU, torch.bfloat16, Experts(8, 32, 16, "swiglu")) == "sorted"


def test_unaligned_shapes_never_choose_grouped_mm() -> None:
    assert choose_backend(CPU, torch.bfloat16, Experts(64, 20, 12, "swiglu")) == "sorted"


def test_cuda_bf16_uses_grouped_mm_and_fp32_does_not() -> None:
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert choose_backend(cuda, torch.bfloat16, Experts(8, 32, 16, "swiglu")) == "grouped_mm"
    assert choose_backend(cuda, torch.float32, Experts(8, 32, 16, "swiglu")) == "sorted"


def test_compute_dtype_follows_autocast() -> None:
    x = torch.zeros(2, 2)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16

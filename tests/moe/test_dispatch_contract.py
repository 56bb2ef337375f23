"""Every registered dispatch backend equals the ``loop`` reference, in outputs and gradients.

Decisions are built by hand so the awkward cases are certain to occur: T=1, an expert with no
tokens, all tokens to one expert, k=E, dropped assignments, nothing kept, expert-choice-like
assignments (any order, a token 0..E times) and non-contiguous input. Gradients are compared
for the input, both expert weight tensors and the router logits (through ``decision.weight``).

Tolerances: fp32 ≤ 1e-5 relative (norm of the difference over the norm of the reference);
bf16 autocast ≤ 2e-2 relative against ``loop`` under the same autocast (bf16 has 8 mantissa
bits, ≈4e-3 per rounding; backends round partial sums in different orders).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from moelab.moe.decision import RoutingDecision
from moelab.moe.dispatch import DISPATCHERS
from moelab.moe.experts import Experts

FP32_RTOL = 1e-5
BF16_RTOL = 2e-2


def make_decision(
    token: list[int] | torch.Tensor,
    expert: list[int] | torch.Tensor,
    logits_TE: torch.Tensor,
    kept: list[bool] | torch.Tensor | None = None,
) -> RoutingDecision:
    """Assignments with combine weight ``softmax(logits)[token, expert]`` (differentiable)."""
    token = torch.as_tensor(token, dtype=torch.long)
    expert = torch.as_tensor(expert, dtype=torch.long)
    A = token.numel()
    device = logits_TE.device
    token, expert = token.to(device), expert.to(device)
    kept = torch.ones(A, dtype=torch.bool) if kept is None else torch.as_tensor(kept, dtype=torch.bool)
    kept = kept.to(device)
    scores_TE = logits_TE.softmax(-1)
    return RoutingDecision(
        token=token,
        expert=expert,
        weight=scores_TE[token, expert],
        rank=torch.zeros(A, dtype=torch.long, device=device),
        kept=kept,
        logits=logits_TE,
        scores=scores_TE,
        num_experts=logits_TE.shape[1],
        batch_shape=(1, logits_TE.shape[0]),
    )


def topk_assignments(T: int, E: int, K: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    expert_TK = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices
    return torch.arange(T).repeat_interleave(K), expert_TK.reshape(-1)


# Each case: (T, E) and a function (gen) -> (token, expert, kept or None).
Case = Callable[[torch.Generator], tuple]
CASES: dict[str, tuple[int, int, Case]] = {
    "topk": (13, 4, lambda g: (*topk_assignments(13, 4, 2, g), None)),
    "T=1": (1, 4, lambda g: (*topk_assignments(1, 4, 2, g), None)),
    "empty_expert": (
        9,
        4,
        lambda g: (torch.arange(9).repeat_interleave(2), torch.tensor([0, 1, 3] * 6), None),
    ),
    "one_expert": (7, 4, lambda g: (torch.arange(7), torch.full((7,), 2), None)),
    "k=E": (6, 4, lambda g: (*topk_assignments(6, 4, 4, g), None)),
    "dropped": (11, 4, lambda g: (*topk_assignments(11, 4, 2, g), torch.rand(22, generator=g) < 0.6)),
    "all_dropped": (5, 4, lambda g: (*topk_assignments(5, 4, 2, g), torch.zeros(10, dtype=torch.bool))),
    "expert_choice": (
        8,
        4,
        lambda g: (
            torch.randint(0, 8, (14,), generator=g),  # tokens 0..E times, unsorted
            torch.randint(0, 4, (14,), generator=g),
            None,
        ),
    ),
}


def run(
    backend: str,
    case: str,
    activation: str = "swiglu",
    D: int = 32,
    F: int = 24,
    bf16: bool = False,
    non_contiguous: bool = False,
) -> dict[str, torch.Tensor]:
    """Output and gradients of one backend on one case (same seed → same weights and inputs)."""
    T, E, make = CASES[case]
    gen = torch.Generator().manual_seed(1234)
    token, expert, kept = make(gen)
    torch.manual_seed(0)
    experts = Experts(E, D, F, activation)
    logits = torch.randn(T, E, generator=gen).requires_grad_()
    x = torch.randn(T, D, generator=gen)
    if non_contiguous:
        x = x.t().contiguous().t()  # same values, stride (1, T)
        assert not x.is_contiguous()
    x.requires_grad_()
    g = torch.randn(T, D, generator=gen)
    decision = make_decision(token, expert, logits, kept)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = DISPATCHERS[backend](x, decision, experts)
    assert y.shape == (T, D)
    if y.requires_grad:  # nothing kept: no path to any parameter, as for ``loop``
        (y.float() * g).sum().backward()
    out = {"y": y.detach().float()}
    for name, t in (("x", x), ("w_up", experts.w_up), ("w_down", experts.w_down), ("logits", logits)):
        out[name] = torch.zeros_like(t) if t.grad is None else t.grad
    return out


def assert_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    for name, ref in want.items():
        err = (got[name] - ref).norm()
        scale = ref.norm()
        if scale == 0:
            assert err == 0, f"{name}: reference is zero, backend gives norm {err:.3g}"
        else:
            assert err <= rtol * scale, f"{name}: relative error {err / scale:.3g} > {rtol}"


BACKENDS = [name for name in DISPATCHERS if name != "loop"]


def test_all_backends_are_registered() -> None:
    assert {"loop", "sorted", "grouped_mm", "padded", "auto"} <= set(DISPATCHERS)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_loop_fp32(backend: str, case: str) -> None:
    assert_match(run(backend, case), run("loop", case), FP32_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bf16", [False, True])
def test_backend_equals_loop_with_experts_wider_than_the_model(backend: str, bf16: bool) -> None:
    """F > D: grouped_mm weights the output rows (F < D, the other cases, weights the activation inside)."""
    got, want = run(backend, "dropped", D=16, F=40, bf16=bf16), run("loop", "dropped", D=16, F=40, bf16=bf16)
    assert_match(got, want, BF16_RTOL if bf16 else FP32_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_loop_non_contiguous_input(backend: str) -> None:
    assert_match(run(backend, "dropped", non_contiguous=True), run("loop", "dropped"), FP32_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_loop_gelu(backend: str) -> None:
    assert_match(run(backend, "topk", activation="gelu"), run("loop", "topk", activation="gelu"), FP32_RTOL)


@pytest.mark.parametrize("case", ["topk", "empty_expert", "k=E", "dropped", "expert_choice"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_loop_bf16_autocast(backend: str, case: str) -> None:
    got, want = run(backend, case, bf16=True), run("loop", case, bf16=True)
    assert_match(got, want, BF16_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_shapes_fall_back_and_still_match(backend: str) -> None:
    """D=20, F=12 in bf16 are not 16-byte strides: grouped_mm must fall back, not fail."""
    got = run(backend, "dropped", D=20, F=12, bf16=True)
    want = run("loop", "dropped", D=20, F=12, bf16=True)
    assert_match(got, want, BF16_RTOL)


def test_reference_matches_written_out_mixture() -> None:
    """Guard against a shared mistake in loop and the others: y_t = Σ_kept w · expert(x_t)."""
    T, E = 5, 3
    gen = torch.Generator().manual_seed(0)
    experts = Experts(E, 16, 8, "swiglu")
    x = torch.randn(T, 16, generator=gen)
    logits = torch.randn(T, E, generator=gen)
    token, expert = [0, 0, 2, 4, 4, 4, 1], [1, 2, 0, 0, 1, 2, 2]
    kept = [True, True, True, False, True, True, False]
    decision = make_decision(token, expert, logits, kept)
    p = logits.softmax(-1)
    want = torch.zeros(T, 16)
    for t, e, k in zip(token, expert, kept):
        if k:
            want[t] += p[t, e] * experts.forward_expert(e, x[t : t + 1])[0]
    for name in DISPATCHERS:
        torch.testing.assert_close(DISPATCHERS[name](x, decision, experts), want, rtol=1e-5, atol=1e-6)


def test_contract_shapes_take_the_grouped_mm_path() -> None:
    """The contract cases above must exercise ``F.grouped_mm`` itself, not only its fallback."""
    experts = Experts(4, 32, 24, "swiglu")
    for dtype in (torch.float32, torch.bfloat16):
        assert experts.grouped_mm_supported(dtype, torch.device("cpu"))
    assert not Experts(4, 20, 12, "swiglu").grouped_mm_supported(torch.bfloat16, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["topk", "empty_expert", "dropped", "expert_choice"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_loop_on_cuda_bf16(backend: str, case: str) -> None:
    """On CUDA, bf16 autocast takes ``F.grouped_mm`` for real (``auto`` and ``grouped_mm``)."""
    T, E, make = CASES[case]
    gen = torch.Generator().manual_seed(7)
    token, expert, kept = make(gen)
    results = []
    for name in (backend, "loop"):
        torch.manual_seed(0)
        experts = Experts(E, 64, 32, "swiglu").cuda()
        logits = torch.randn(T, E, generator=torch.Generator().manual_seed(1)).cuda().requires_grad_()
        x = torch.randn(T, 64, generator=torch.Generator().manual_seed(2)).cuda().requires_grad_()
        decision = make_decision(token, expert, logits, kept)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = DISPATCHERS[name](x, decision, experts)
        (y.float() * torch.ones_like(x).mul(0.5)).sum().backward()
        results.append({"y": y.float(), "x": x.grad, "w_up": experts.w_up.grad, "logits": logits.grad})
    assert_match(*results, BF16_RTOL)

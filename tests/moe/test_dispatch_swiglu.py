"""The memory-lean SwiGLU (recomputes silu in the backward) equals the plain formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.benchmarks.timing import saved_for_backward_bytes
from moelab.nn.activations import activate_lean


def test_values_and_gradients_equal_silu_gate_times_up() -> None:
    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 5, dtype=torch.float64)
    (activate_lean(h, "swiglu") * g).sum().backward()
    lean = h.grad.clone()
    h.grad = None
    gate, up = h[:, :5], h[:, 5:]
    want = gate * torch.sigmoid(gate) * up  # silu(x) = x·σ(x), written out
    (want * g).sum().backward()
    torch.testing.assert_close(activate_lean(h, "swiglu"), want)
    torch.testing.assert_close(lean, h.grad)
    assert torch.autograd.gradcheck(lambda t: activate_lean(t, "swiglu"), (torch.randn(3, 4, dtype=torch.float64, requires_grad=True),))


def test_saves_only_its_input() -> None:
    h = torch.randn(64, 32, requires_grad=True)
    lean = saved_for_backward_bytes(lambda: activate_lean(h, "swiglu"))
    plain = saved_for_backward_bytes(lambda: F.silu(h[:, :16]) * h[:, 16:])
    assert lean == h.numel() * 4
    assert plain == h.numel() * 4 + 64 * 16 * 4  # plus silu(gate)


def test_gelu_and_no_grad_take_the_plain_path() -> None:
    h = torch.randn(3, 8)
    torch.testing.assert_close(activate_lean(h, "gelu"), F.gelu(h))
    torch.testing.assert_close(activate_lean(h, "swiglu"), F.silu(h[:, :4]) * h[:, 4:])

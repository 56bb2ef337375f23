"""QuantExperts keeps the Experts interface: the MoE layer and dispatch work unchanged.

Reference: an ordinary ``Experts`` holding the *dequantized* weights, run through the same
layer; the quantized module must give the same output (to fp32 rounding), per expert and
through ``forward(x_RD, tokens_per_expert)``, including empty experts and T=1.
"""

from __future__ import annotations

import pytest
import torch

from moelab.moe.dispatch import DISPATCHERS
from moelab.moe.experts import Experts
from moelab.moe.layer import MoELayer
from moelab.quant import QuantExperts
from moelab.quant.experts import NoStackedWeightsError
from quant.reference import reference_weight

from helpers import tiny_moe


def dequantized_experts(q: QuantExperts) -> Experts:
    ref = Experts(q.num_experts, q.d_model, q.hidden, q.activation)
    with torch.no_grad():
        for e in range(q.num_experts):
            ref.w_up[e] = reference_weight(q.up[e])
            ref.w_down[e] = reference_weight(q.down[e])
    return ref


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 128)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_forward_matches_dequantized_experts(bits, group, activation):
    experts = Experts(4, 40, 24, activation)  # D=40, F=24: neither a multiple of 32
    q = QuantExperts.from_experts(experts, bits, group)
    ref = dequantized_experts(q)
    counts = [3, 0, 1, 5]  # an empty expert, a single row
    x = torch.randn(sum(counts), 40)
    torch.testing.assert_close(q(x, counts), ref(x, counts), atol=1e-5, rtol=1e-5)
    for e in range(4):
        torch.testing.assert_close(q.forward_expert(e, x[:2]), ref.forward_expert(e, x[:2]), atol=1e-5, rtol=1e-5)
    assert q(x[:0], [0, 0, 0, 0]).shape == (0, 40)


def test_quantized_experts_are_close_to_the_originals():
    experts = Experts(4, 64, 64, "swiglu")
    x = torch.randn(6, 64)
    counts = [2, 2, 1, 1]
    full = experts(x, counts)
    err8 = (QuantExperts.from_experts(experts, 8)(x, counts) - full).norm() / full.norm()
    err4 = (QuantExperts.from_experts(experts, 4, 32)(x, counts) - full).norm() / full.norm()
    assert err8 < 0.02 and err4 < 0.2 and err8 < err4


@pytest.mark.parametrize("dispatch", list(DISPATCHERS))
@pytest.mark.parametrize("tokens", [1, 7])
def test_moe_layer_runs_unchanged_with_quantized_experts(tokens, dispatch):
    """Every registered dispatch backend, T=1 and T>1: quantized = dequantized reference.

    A backend that reads the stacked weights directly must refuse with the one-line error."""
    layer = MoELayer(32, tiny_moe(dispatch=dispatch), "swiglu").eval()
    layer.experts = QuantExperts.from_experts(layer.experts, 4, 32)
    x = torch.randn(1, tokens, 32)
    with torch.no_grad():
        try:
            y = layer(x).y
        except NoStackedWeightsError:
            pytest.skip(f"dispatch {dispatch!r} reads stacked expert weights: refused with a clear error")
        layer.experts = dequantized_experts(layer.experts)
        ref = layer(x).y
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_bf16_weights_keep_bf16_scales():
    experts = Experts(2, 64, 32, "swiglu").to(torch.bfloat16)
    q = QuantExperts.from_experts(experts, 8)
    assert q.up[0].scales.dtype == torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y, ref = q(x, [2, 1]), experts(x, [2, 1])
    assert y.dtype == torch.bfloat16
    assert ((y - ref).float().norm() / ref.float().norm()) < 0.05


def test_reading_stacked_weights_is_a_user_error_and_hasattr_is_false():
    from moelab.errors import UserError

    q = QuantExperts.from_experts(Experts(2, 32, 32, "swiglu"), 8)
    assert not hasattr(q, "w_up")
    with pytest.raises(UserError, match="no stacked w_down"):
        _ = q.w_down
    with pytest.raises(AttributeError):
        _ = q.no_such_thing

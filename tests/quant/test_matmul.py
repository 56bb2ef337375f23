"""int8 / int4 weight-only matmuls against dequantize-then-F.linear, on awkward shapes.

The reference dequantizes the module's *stored* integers with the formulas written out here
(not with moelab's own dequantize), then calls F.linear: so the kernels, the int4 packing, the
padding of K and N, and the save format are all checked at once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.config import ConfigError
from moelab.quant import QuantLinear
from quant.reference import reference_weight

SHAPES = [  # (N outputs, K inputs): K not a multiple of 32 or of the group, odd N, N < 16, tiny
    (17, 33),
    (48, 128),
    (5, 24),
    (64, 200),
    (1, 7),
    (130, 256),
]


CASES = [(8, 32), (4, 32), (4, 64), (4, 128)]


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_matmul_equals_dequantize_then_linear_fp32(bits, group, n, k, rows):
    w = torch.randn(n, k)
    mod = QuantLinear.from_weight(w, bits, group)
    x = torch.randn(rows, k)
    ref = F.linear(x, reference_weight(mod))
    torch.testing.assert_close(mod(x), ref, atol=1e-5 * (1 + ref.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("n,k", [(17, 33), (96, 256), (3, 40)])
def test_matmul_bf16_and_batched_leading_dims(bits, group, n, k):
    mod = QuantLinear.from_weight(torch.randn(n, k), bits, group).to(torch.bfloat16)
    x = torch.randn(2, 3, k, dtype=torch.bfloat16)
    y = mod(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, n)
    ref = F.linear(x.float(), reference_weight(mod))  # stored scales are bf16 now
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.float(), ref, atol=2e-2 * scale, rtol=2e-2)


def test_quantization_error_is_within_half_a_step():
    """|w − ŵ| ≤ step/2: int8 step = max|row|/127, int4 step = (max − min)/15 of the group."""
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    q8 = reference_weight(QuantLinear.from_weight(w, 8))
    step8 = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((w - q8).abs() <= step8 / 2 + 1e-6).all()
    q4 = reference_weight(QuantLinear.from_weight(w, 4, 32))
    wg = w.reshape(32, 2, 32)
    step4 = ((wg.amax(-1) - wg.amin(-1)) / 15).repeat_interleave(32, dim=1)
    assert ((w - q4).abs() <= step4 / 2 + 1e-5).all()
    assert not torch.equal(q4, q8)


def test_constant_rows_and_groups_are_exact():
    w = torch.zeros(16, 64)
    w[1] = 0.5
    w[2, :32] = -3.0
    for bits in (8, 4):
        torch.testing.assert_close(reference_weight(QuantLinear.from_weight(w, bits, 32)), w, atol=1e-6, rtol=0)


def test_zero_rows_of_input_and_bias():
    w, b = torch.randn(20, 40), torch.randn(20)
    for bits in (8, 4):
        mod = QuantLinear.from_weight(w, bits, 32, bias=b)
        assert mod(torch.randn(0, 40)).shape == (0, 20)
        x = torch.randn(3, 40)
        torch.testing.assert_close(mod(x), F.linear(x, reference_weight(mod), b), atol=1e-5, rtol=1e-5)


def test_padding_is_reported_in_shapes():
    """K=33 pads to 64 for int4 group 64 and to 64 for int8 (multiple of 32); N=17 pads to 32 for int4."""
    m4 = QuantLinear.from_weight(torch.randn(17, 33), 4, 64)
    assert m4.state_dict()["qweight"].shape == (32, 32) and m4.state_dict()["scales_zeros"].shape == (1, 32, 2)
    m8 = QuantLinear.from_weight(torch.randn(17, 33), 8)
    assert m8.state_dict()["qweight"].shape == (17, 64)


@pytest.mark.parametrize("kw", [{"bits": 3}, {"bits": 4, "group_size": 16}, {"bits": 4, "group_size": 48}])
def test_unsupported_settings_raise_config_error(kw):
    kw = dict(kw)  # parametrize shares the dict between runs
    with pytest.raises(ConfigError, match="quant\\."):
        QuantLinear(64, 64, kw.pop("bits"), **kw)


def test_missing_kernel_is_a_user_error():
    from moelab.errors import UserError
    from moelab.quant import kernels

    with pytest.raises(UserError, match="no int4 weight-only kernel for device 'meta'"):
        kernels.kernel_for(4, "meta")
    with pytest.raises(UserError, match="_weight_int8pack_mm"):
        kernels.require_op("_weight_int8pack_mm", torch.device("meta"))


def test_int4_scales_follow_the_kernel_layout_and_save_plain():
    """The native kernel keeps int4 scales block-major in memory; every way out (state dict,
    dequantized weight, another kernel's layout) sees PyTorch's group-major order again."""
    from moelab.quant import kernels

    mod = QuantLinear.from_weight(torch.randn(40, 128), 4, 32)  # 3 row blocks × 4 groups: the orders differ
    stored = mod.scales_zeros.clone()
    weight = mod.dequantized_weight()
    x = torch.randn(3, 128)
    y = mod(x)  # packs for the CPU kernel
    if mod.layout == "native-int4":
        assert not torch.equal(mod.scales_zeros, stored)  # the kernel's own order, same shape
        assert mod.scales_zeros.shape == stored.shape
    assert torch.equal(mod.plain_scales(), stored)
    assert torch.equal(mod.state_dict()["scales_zeros"], stored)
    assert torch.equal(mod.dequantized_weight(), weight)
    aten = kernels.kernel_named("aten-int4-cpu")
    other = QuantLinear.from_weight(torch.zeros(40, 128), 4, 32)
    other.load_state_dict(mod.state_dict())
    assert other.layout is None and torch.equal(other.scales_zeros, stored)
    y_aten = kernels.matmul(aten, x, aten.pack(mod.plain_qweight()), aten.pack_scales(mod.plain_scales()), 40, 32)
    torch.testing.assert_close(y_aten, y, atol=1e-4, rtol=1e-4)  # PyTorch's kernel reads the plain order
    torch.testing.assert_close(y, F.linear(x, reference_weight(mod)), atol=1e-4, rtol=1e-4)

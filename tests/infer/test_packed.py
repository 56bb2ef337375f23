"""Prepacked weights (oneDNN's layout, moelab's native bf16 layout) compute the same maps as the plain modules."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import tiny_config, tiny_moe
from torch import nn

from moelab.errors import UserError
from moelab.infer.fast_decode import FastDecoder, cast_for_decode
from moelab.infer.packed import (
    NativeExperts,
    NativeLinear,
    PackedExperts,
    PackedLinear,
    native_available,
    pack_for_decode,
    packed_bytes,
    packing_available,
)
from moelab.model.transformer import Transformer
from moelab.moe.experts import Experts

pytestmark = pytest.mark.skipif(not packing_available(torch.bfloat16), reason="no oneDNN prepacking in this torch build")
needs_native = pytest.mark.skipif(not native_available(), reason="moelab's native kernels do not build here")
BACKENDS = ["onednn", pytest.param("native", marks=needs_native)]
KINDS = {"onednn": (PackedLinear, PackedExperts), "native": (NativeLinear, NativeExperts)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 3, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(dtype: torch.dtype, rows: int, bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(37, 19, bias=bias).to(dtype)  # odd sizes
    x = torch.randn(2, rows, 37, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(PackedLinear(lin)(x), lin(x), rtol=tol, atol=tol)


def test_packed_linear_takes_non_contiguous_input() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(16, 5).t()  # [5, 16], not contiguous
    torch.testing.assert_close(PackedLinear(lin)(x), lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_packed_experts_equal_experts(activation: str) -> None:
    torch.manual_seed(0)
    ex = Experts(num_experts=4, d_model=24, hidden=40, activation=activation)
    packed = PackedExperts(ex)
    x = torch.randn(9, 24)
    counts = [3, 0, 6, 0]  # empty experts
    torch.testing.assert_close(packed(x, counts), ex(x, counts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.forward_expert(2, x[:1]), ex.forward_expert(2, x[:1]), rtol=1e-5, atol=1e-5)
    assert packed(x[:0], [0, 0, 0, 0]).shape == (0, 24)
    buf = torch.randn(4, 2, 24)
    torch.testing.assert_close(packed.forward_padded(buf), ex.forward_padded(buf), rtol=1e-5, atol=1e-5)
    assert not packed.grouped_mm_supported(torch.float32, torch.device("cpu"))


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 8, 9, 33])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(19, 40), (64, 64), (1, 8)])
def test_native_linear_equals_linear(dtype: torch.dtype, rows: int, bias: bool, n: int, k: int) -> None:
    """Every path of the kernels (1 row, 2..8 rows, more in chunks of 8), odd N, K = 8."""
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    x = torch.randn(2, rows, k, dtype=dtype)
    ref = nn.functional.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
    got = NativeLinear(lin)(x)
    assert got.dtype == dtype and got.shape == (2, rows, n)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


@needs_native
def test_native_layout_refuses_inputs_not_a_multiple_of_8_and_pack_falls_back() -> None:
    with pytest.raises(ValueError, match="K % 8"):
        NativeLinear(nn.Linear(37, 19).to(torch.bfloat16))
    model = nn.Sequential(nn.Linear(37, 16), nn.Linear(16, 8)).to(torch.bfloat16)
    assert pack_for_decode(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1], NativeLinear)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_native_experts_equal_experts(dtype: torch.dtype, activation: str) -> None:
    torch.manual_seed(0)
    ex = Experts(num_experts=4, d_model=24, hidden=40, activation=activation).to(dtype)
    native = NativeExperts(ex)
    x = torch.randn(9, 24, dtype=dtype)
    counts = [3, 0, 6, 0]  # empty experts
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(native(x, counts).float(), ex(x, counts).float(), rtol=tol, atol=tol)
    torch.testing.assert_close(native.forward_expert(2, x[:1]).float(), ex.forward_expert(2, x[:1]).float(), rtol=tol, atol=tol)
    assert native(x[:0], [0, 0, 0, 0]).shape == (0, 24)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_for_decode_skips_routers_and_counts_bytes(backend: str) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config(moe=tiny_moe())).eval().to(torch.bfloat16)
    n = pack_for_decode(model, backend=backend)
    kinds = {type(m) for m in model.modules()}
    linear_kind, experts_kind = KINDS[backend]
    assert n > 0 and linear_kind in kinds and experts_kind in kinds and Experts not in kinds
    router_mods = [m for p, m in model.named_modules() if ".router" in f".{p}"]
    assert any(isinstance(m, nn.Linear) for m in router_mods)  # the gate stays a plain fp32-capable linear
    assert not any(isinstance(m, linear_kind) for m in router_mods)
    assert packed_bytes(model) > 0


def test_unknown_backend_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown packing backend"):
        pack_for_decode(nn.Linear(8, 8), backend="mkl")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("moe", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_packed_bf16_decode_tracks_plain_bf16(backend: str, moe: bool, batch: int) -> None:
    """Packed and plain bf16 decoders see the same tokens and agree to bf16 precision."""
    torch.manual_seed(0)
    base = Transformer(tiny_config(moe=tiny_moe()) if moe else tiny_config()).eval()
    plain = cast_for_decode(base, torch.bfloat16, pack=False)
    packed = cast_for_decode(base, torch.bfloat16, backend=backend)
    assert any(isinstance(m, KINDS[backend][0]) for m in packed.modules())
    ids = torch.randint(0, 90, (batch, 7))
    a, b = FastDecoder(plain, batch, 12), FastDecoder(packed, batch, 12)
    torch.testing.assert_close(b.prefill(ids).float(), a.prefill(ids).float(), rtol=0.05, atol=0.05)
    for t in range(4):
        tok = torch.full((batch, 1), 3 + t)
        torch.testing.assert_close(b.step(tok).float(), a.step(tok).float(), rtol=0.05, atol=0.05)


def test_fp32_cast_packs_only_natively() -> None:
    """oneDNN's layout gains nothing in fp32: an fp32 decode copy is packed natively or not at all."""
    base = Transformer(tiny_config()).eval()
    kinds = {type(m) for m in cast_for_decode(base, torch.float32).modules()}
    assert PackedLinear not in kinds and (NativeLinear in kinds) == native_available()
    assert NativeLinear not in {type(m) for m in cast_for_decode(base, torch.float32, backend="onednn").modules()}

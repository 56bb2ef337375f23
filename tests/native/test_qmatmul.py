"""moelab's native int8/int4 kernels against the formulas written out, PyTorch's kernels, and each other.

Each case runs on three builds of the same source: the default one (``-march=native``: AVX-512,
VNNI and BF16 on the CPUs seen here), one without VNNI (bf16 dot products and FMAs), and a
generic one without AVX-512, so every code path is checked wherever the tests run on such a CPU. Row counts cover every path: 1 (fused
single-row), 2..8 (fused few-row), > 8 (dequantize-a-block).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from moelab.native import build, qmatmul
from moelab.quant import QuantLinear, kernels
from moelab.quant.linear import pack_nibbles

BUILDS = {"default": (), "no-vnni": ("-mno-avx512vnni",), "generic": ("-mno-avx512f",)}


@pytest.fixture(params=list(BUILDS))
def lib(request, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        found = build.library(BUILDS[request.param])
    if found is None:
        pytest.skip(f"native build {request.param!r} unavailable: {build.unavailable_reason()}")
    monkeypatch.setattr(qmatmul, "library", lambda: found)
    return found


def int8_case(n: int, k: int, dtype: torch.dtype):
    w = torch.randn(n, k)
    scales = (w.abs().amax(1) / 127).to(dtype)
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales, q.float() * scales.float()[:, None]  # ŵ = q · s


def int4_case(n: int, k: int, group: int, dtype: torch.dtype):
    n_padded = -(-n // 16) * 16
    q = torch.randint(0, 16, (n_padded, k))
    sz = torch.randn(k // group, n_padded, 2).to(dtype)
    scale = sz[..., 0].float().repeat_interleave(group, 0).T  # [Np, K]
    zero = sz[..., 1].float().repeat_interleave(group, 0).T
    return q, sz, ((q.float() - 8) * scale + zero)[:n]  # ŵ = (q − 8) · scale + zero


def assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item() + 1e-6
    if y.dtype == torch.bfloat16:  # accumulation in fp32, one rounding to bf16 at the end
        torch.testing.assert_close(y.float(), ref, atol=scale / 128, rtol=1 / 128)
    else:
        torch.testing.assert_close(y, ref, atol=2e-6 * scale, rtol=1e-5)


SHAPES = [(1, 32), (17, 64), (48, 128), (130, 256), (3072, 96)]  # N not a multiple of 16, N = 1, wide
ROWS = [1, 2, 3, 5, 8, 9, 33]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_equals_formula(lib, n, k, m, dtype):
    q, scales, w = int8_case(n, k, dtype)
    x = torch.randn(m, k).to(dtype)
    y = qmatmul.q8_matmul(x, qmatmul.interleave_rows(q), scales, n)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_matches(y, F.linear(x.float(), w))


@pytest.mark.parametrize("n,k,group", [(16, 32, 32), (17, 64, 32), (48, 128, 64), (130, 256, 128), (5, 256, 256)])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_equals_formula(lib, n, k, group, m, dtype):
    q, sz, w = int4_case(n, k, group, dtype)
    x = torch.randn(m, k).to(dtype)
    y = qmatmul.q4_matmul(x, qmatmul.lane_major_rows(pack_nibbles(q)), group, qmatmul.block_major_scales(sz), n)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_matches(y, F.linear(x.float(), w))


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_few_rows_equal_each_row_alone(lib, m, dtype):
    """Where the few-row kernels share one read of the weights between rows with the single-row
    arithmetic (integer dot products for int8, and for int4 with fp32 rows or two bf16 rows; four
    chains per row for bf16 weights up to four rows), each row equals that row multiplied alone,
    bitwise: batching decode rows changes no token."""
    torch.manual_seed(m)
    n, k = 70, 256
    x = torch.randn(m, k).to(dtype)
    rows = lambda f: torch.cat([f(x[i : i + 1]) for i in range(m)])  # noqa: E731
    checked = 0
    if lib.moelab_native_vnni():
        q, scales, _ = int8_case(n, k, dtype)
        f8 = lambda a: qmatmul.q8_matmul(a, qmatmul.interleave_rows(q), scales, n)  # noqa: E731
        assert torch.equal(f8(x), rows(f8))
        checked += 1
        if dtype == torch.float32 or m == 2 or not lib.moelab_native_bf16_dot():
            q4, sz, _ = int4_case(n, k, 64, dtype)
            f4 = lambda a: qmatmul.q4_matmul(a, qmatmul.lane_major_rows(pack_nibbles(q4)), 64, qmatmul.block_major_scales(sz), n)  # noqa: E731
            assert torch.equal(f4(x), rows(f4))
            checked += 1
    if lib.moelab_native_bf16_dot() and dtype == torch.bfloat16 and m <= 4:
        packed = qmatmul.bf16_pack(torch.randn(n, k).to(torch.bfloat16))
        fb = lambda a: qmatmul.bf16_matmul(a, packed, n)  # noqa: E731
        assert torch.equal(fb(x), rows(fb))
        checked += 1
    if not checked:
        pytest.skip("this build has no few-row path that shares the single-row arithmetic")


@pytest.mark.parametrize("m", [9, 12, 17, 40, 101])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_rows_match_the_formula_and_decode_rows(m, dtype):
    """Beyond eight rows (prefill) the blocks go eight rows at a time through bf16 dot products (int8 and, from
    17 rows, int4 blocks converted once to bf16 pairs) or a dequantized block (fp32 rows): each the same
    product as the few-row kernels eight rows at a time, to the rounding of bf16 outputs."""
    if build.library() is None:
        pytest.skip(f"native kernels unavailable: {build.unavailable_reason()}")
    torch.manual_seed(m)
    n, k = 40, 128
    x = torch.randn(m, k).to(dtype)
    w = torch.randn(n, k)
    q, scales, w8 = int8_case(n, k, dtype)
    q4, sz, w4 = int4_case(n, k, 32, dtype)
    cases = [
        (lambda a: qmatmul.q8_matmul(a, qmatmul.interleave_rows(q), scales, n), w8),
        (lambda a: qmatmul.q4_matmul(a, qmatmul.lane_major_rows(pack_nibbles(q4)), 32, qmatmul.block_major_scales(sz), n), w4),
    ]
    if dtype == torch.bfloat16:
        cases.append((lambda a: qmatmul.bf16_matmul(a, qmatmul.bf16_pack(w.to(dtype)), n), w.to(dtype).float()))
    else:
        cases.append((lambda a: qmatmul.f32_matmul(a, qmatmul.f32_pack(w), n), w))
    for case, (f, ref) in enumerate(cases):
        together = f(x)
        by_eights = torch.cat([f(x[i : i + 8]) for i in range(0, m, 8)])  # the few-row kernels
        assert_matches(together, F.linear(x.float(), ref))
        assert_matches(together, by_eights.float())
        full = m // 8 * 8  # whole groups of eight: int4 bf16 rows take the same dot products either way
        if case == 1 and dtype == torch.bfloat16 and qmatmul.library().moelab_native_bf16_dot():
            assert torch.equal(together[:full], by_eights[:full])  # nibbles converted once = per eight rows


@pytest.mark.parametrize("m", [1, 4, 17])
def test_equal_to_pytorch_kernels_fp32(lib, m):
    """Same integers, same scales: moelab's kernels and PyTorch's agree to fp32 rounding (relative
    to the outputs' scale: the sums run in different orders, and one row of x goes through
    integer limbs where the CPU has VNNI)."""
    q8, s8, _ = int8_case(96, 128, torch.float32)
    x = torch.randn(m, 128)
    ours = qmatmul.q8_matmul(x, qmatmul.interleave_rows(q8), s8, 96)
    assert_matches(ours, torch.ops.aten._weight_int8pack_mm(x, q8, s8))
    q4, sz, _ = int4_case(96, 128, 32, torch.float32)
    ours = qmatmul.q4_matmul(x, qmatmul.lane_major_rows(pack_nibbles(q4)), 32, qmatmul.block_major_scales(sz), 96)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32), 2)
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    assert_matches(ours, theirs)


def test_awkward_values_and_empty_input(lib):
    """All-zero weights and x, extreme int8 values, and M = 0."""
    q = torch.full((32, 64), -128, dtype=torch.int8)
    q[1] = 127
    q[2] = 0
    s = torch.ones(32)
    x = torch.ones(1, 64)
    y = qmatmul.q8_matmul(x, qmatmul.interleave_rows(q), s, 32)
    assert y[0, 0] == -128 * 64 and y[0, 1] == 127 * 64 and y[0, 2] == 0
    assert qmatmul.q8_matmul(torch.zeros(0, 64), qmatmul.interleave_rows(q), s, 32).shape == (0, 32)
    assert torch.equal(qmatmul.q8_matmul(torch.zeros(3, 64), qmatmul.interleave_rows(q), s, 32), torch.zeros(3, 32))


def test_results_do_not_depend_on_the_thread_count(lib):
    q, s, _ = int8_case(200, 256, torch.bfloat16)
    q4, sz, _ = int4_case(200, 256, 64, torch.bfloat16)
    x = torch.randn(5, 256).to(torch.bfloat16)
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            out.append((qmatmul.q8_matmul(x, qmatmul.interleave_rows(q), s, 200),
                        qmatmul.q4_matmul(x[:1], qmatmul.lane_major_rows(pack_nibbles(q4)), 64, qmatmul.block_major_scales(sz), 200)))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for a, b in out[1:]:
        assert torch.equal(a, out[0][0]) and torch.equal(b, out[0][1])


def test_layout_round_trip_and_padding():
    plain = torch.randint(-128, 128, (37, 24), dtype=torch.int8)
    packed = qmatmul.interleave_rows(plain)
    assert packed.shape == (48, 24)
    assert torch.equal(packed.reshape(3, 24, 16)[0, 5], plain[:16, 5])  # 16 rows side by side per input
    assert torch.equal(packed.reshape(3, 24, 16)[2, :, 5:], torch.zeros(24, 11, dtype=torch.int8))
    assert torch.equal(qmatmul.deinterleave_rows(packed, 37), plain)
    nibbles = torch.randint(0, 256, (37, 24), dtype=torch.uint8)  # int4: 48 inputs per row
    lanes = qmatmul.lane_major_rows(nibbles)
    assert lanes.shape == (48, 24)
    assert torch.equal(lanes.reshape(3, 6, 16, 4)[0, 2, 5], nibbles[5, 8:12])  # row 5's bytes 8..11: one 32-bit lane
    assert torch.equal(qmatmul.from_lane_major(lanes, 37), nibbles)
    with pytest.raises(ValueError, match="K % 8"):
        qmatmul.lane_major_rows(torch.zeros(16, 6, dtype=torch.uint8))


def test_bad_arguments_are_refused_before_c(lib):
    q, s, _ = int8_case(16, 64, torch.float32)
    packed = qmatmul.interleave_rows(q)
    with pytest.raises(ValueError, match="same dtype"):
        qmatmul.q8_matmul(torch.randn(1, 64).bfloat16(), packed, s, 16)
    with pytest.raises(ValueError, match="contiguous x"):
        qmatmul.q8_matmul(torch.randn(1, 32), packed, s, 16)
    with pytest.raises(ValueError, match="contiguous x"):
        qmatmul.q8_matmul(torch.randn(64, 2).T, packed, s, 16)
    with pytest.raises(ValueError, match="fewer than"):
        qmatmul.q8_matmul(torch.randn(1, 64), packed, s, 40)
    q4, sz, _ = int4_case(16, 64, 32, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        qmatmul.q4_matmul(torch.randn(1, 64), qmatmul.lane_major_rows(pack_nibbles(q4)), 64, qmatmul.block_major_scales(sz), 16)


def test_no_compiler_falls_back_to_pytorch_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    build.reset()
    try:
        with pytest.warns(RuntimeWarning, match="native int8/int4 kernels are unavailable"):
            assert build.library() is None
        assert "failed" in build.unavailable_reason()
        assert kernels.kernel_for(8, "cpu").name == "aten-int8"
        assert kernels.kernel_for(4, "cpu").name == "aten-int4-cpu"
        mod = QuantLinear.from_weight(torch.randn(24, 64), 8)
        x = torch.randn(2, 64)
        torch.testing.assert_close(mod(x), F.linear(x, mod.dequantized_weight()), atol=1e-5, rtol=1e-5)
    finally:
        monkeypatch.undo()
        build.reset()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    build.reset()
    try:
        assert build.library() is None and "MOELAB_NATIVE=0" in build.unavailable_reason()
    finally:
        monkeypatch.undo()
        build.reset()


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    build.reset()
    try:
        if build.library() is None:
            pytest.skip(f"native kernels unavailable: {build.unavailable_reason()}")
        files = list((tmp_path / "native").rglob("*"))
        assert [f.name for f in files if f.is_file()] == ["libmoelab_qmatmul.so"]  # no temporary left behind
        stamp = next(f for f in files if f.is_file()).stat().st_mtime_ns
        build.reset()
        assert build.library() is not None
        assert next(f for f in (tmp_path / "native").rglob("*.so")).stat().st_mtime_ns == stamp  # not rebuilt
    finally:
        monkeypatch.undo()
        build.reset()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layer_switches_layouts_and_saves_plain(bits, monkeypatch):
    """A layer packed for the native kernel keeps saving its plain form, and repacks for PyTorch's
    kernel when the native one is turned off, with the same outputs."""
    build.reset()
    if build.library() is None:
        pytest.skip(f"native kernels unavailable: {build.unavailable_reason()}")
    mod = QuantLinear.from_weight(torch.randn(40, 96), bits, 32)
    plain = {k: v.clone() for k, v in mod.state_dict().items()}
    x = torch.randn(3, 96)
    native = mod(x)
    assert mod.layout == f"native-int{bits}"
    assert all(torch.equal(v, plain[k]) for k, v in mod.state_dict().items())
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    build.reset()
    try:
        fallback = mod(x)
        assert mod.layout.startswith("aten-")
        assert_matches(fallback, native)  # integer limbs (VNNI) vs PyTorch's fp32 sums: fp32 rounding of the output's scale
        assert all(torch.equal(v, plain[k]) for k, v in mod.state_dict().items())
    finally:
        monkeypatch.undo()
        build.reset()


@pytest.mark.skipif(build.library() is None, reason="no C compiler: the native kernels are not built")
def test_kernels_are_torch_operators_the_profiler_and_compile_see() -> None:
    """torch.ops.moelab.*: the profiler names the kernel, and torch.compile traces through it (its shape
    function) with the same result as eager."""
    torch.manual_seed(0)
    w = torch.randn(48, 64).to(torch.bfloat16)
    packed = qmatmul.bf16_pack(w)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.profiler.profile() as prof:
        y = qmatmul.bf16_matmul(x, packed, 48)
    assert "moelab::bf16_matmul" in {e.name for e in prof.events()}
    compiled = torch.compile(lambda a: qmatmul.bf16_matmul(a, packed, 48) * 2, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), y * 2)
    fake = torch.ops.moelab.bf16_matmul.default(x.to("meta"), packed.to("meta"), 48)
    assert fake.shape == (3, 48) and fake.dtype == torch.bfloat16

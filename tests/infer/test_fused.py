"""Fused batch-1 feed-forward steps (one native call per block) against the modules they replace."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.helpers import tiny_config, tiny_moe
from torch import nn

from moelab.config import RouterConfig
from moelab.infer.fast_decode import FastDecoder, _decode_spec, _lone_token_choice, cast_for_decode
from moelab.infer.fused import block_step, fused_ffn, fused_moe
from moelab.infer.packed import native_available
from moelab.model.transformer import Transformer
from moelab.nn.ffn import DenseMLP, GatedDenseMLP
from moelab.quant import quantize_model

pytestmark = pytest.mark.skipif(not native_available(), reason="moelab's native kernels do not build here")

VARIANTS = ["bf16", "fp32", "int8-bf16", "int4-bf16", "int8-fp32", "int4-fp32"]


def decode_copy(model: nn.Module, variant: str) -> nn.Module:
    """``model`` as the fast decoder runs it: bf16 in the native layout, or quantized (every
    linear but routers) with bf16 or fp32 activations."""
    if variant in ("bf16", "fp32"):
        return cast_for_decode(model, torch.bfloat16 if variant == "bf16" else torch.float32)
    bits, act = variant.split("-")
    dtype = torch.bfloat16 if act == "bf16" else torch.float32
    base = cast_for_decode(model, dtype, pack=False)
    return quantize_model(base, bits=int(bits[3:]), group_size=32, only="all")


def tol(variant: str) -> float:
    return 1e-4 if variant.endswith("fp32") else 3e-2  # fp32: summation order; bf16: roundings


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_ffn_equals_dense_mlp(variant: str) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config(d_model=64, ffn_hidden=96)).eval()
    dec = decode_copy(model, variant)
    act = dec.embed.weight.dtype
    mlp = dec.blocks[0].ffn
    step = fused_ffn(mlp, act)
    assert step is not None
    for _ in range(3):
        x = torch.randn(64).to(act)
        torch.testing.assert_close(step(x).float(), mlp(x[None]).float()[0], rtol=tol(variant), atol=tol(variant))


ROUTERS = {
    "renormalize": RouterConfig(),
    "probs": RouterConfig(renormalize=False),
    "softmax_after_topk": RouterConfig(softmax_after_topk=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", list(ROUTERS))
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_fused_moe_routes_and_computes_like_the_modules(variant: str, mode: str, top_k: int) -> None:
    """Same experts as the router's own operations, same combine weights, same output to rounding."""
    torch.manual_seed(0)
    cfg = tiny_config(d_model=64, moe=tiny_moe(num_experts=6, top_k=top_k, expert_hidden=64, router=ROUTERS[mode]))
    dec = decode_copy(Transformer(cfg).eval(), variant)
    act = dec.embed.weight.dtype
    ffn = dec.blocks[1].ffn
    spec = _decode_spec(ffn)
    assert spec is not None and spec.weights == mode and spec.top_k == top_k
    step = fused_moe(ffn, act, spec)
    assert step is not None
    for _ in range(5):
        x = torch.randn(64).to(act)
        y = step(x)
        experts, weights = _lone_token_choice(ffn.router, spec, x[None])
        assert step.ids == sorted(experts)
        expected_w = dict(zip(experts, weights.to(act).tolist()))
        for e, w in zip(step.ids, step.weights):
            assert w == pytest.approx(expected_w[e], rel=1e-6 if act == torch.float32 else 1e-2)
        ref = sum(ffn.experts.forward_expert(e, x[None])[0].float() * expected_w[e] for e in sorted(experts))
        torch.testing.assert_close(y.float(), ref, rtol=tol(variant), atol=tol(variant))


@pytest.mark.parametrize("variant", ["bf16", "fp32", "int8-bf16", "int4-fp32"])
@pytest.mark.parametrize("shared", [False, True])
def test_fast_decoder_with_fused_blocks_tracks_the_unfused_one(variant: str, shared: bool) -> None:
    """Whole decode steps, fused or not: same greedy tokens, logits equal to rounding; a shared
    expert is added to the fused routed output."""
    torch.manual_seed(0)
    moe = tiny_moe(num_experts=4, top_k=2, expert_hidden=64, num_shared_experts=1 if shared else 0, placement="first_k_dense")
    cfg = tiny_config(d_model=64, ffn_hidden=96, moe=moe)
    dec_model = decode_copy(Transformer(cfg).eval(), variant)
    fused, plain = FastDecoder(dec_model, 1, 20), FastDecoder(dec_model, 1, 20, fused=False)
    assert all(s is not None for s in fused.ffn_steps) and all(s is None for s in plain.ffn_steps)
    ids = torch.randint(0, 90, (1, 6))
    a, b = fused.prefill(ids), plain.prefill(ids)
    for _ in range(6):
        tok = b.argmax(-1, keepdim=True)
        a, b = fused.step(tok), plain.step(tok)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        torch.testing.assert_close(a.float(), b.float(), rtol=5 * tol(variant), atol=5 * tol(variant))


def test_blocks_that_do_not_qualify_keep_their_modules() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(d_model=64, ffn_hidden=96, moe=tiny_moe(expert_hidden=64, placement="first_k_dense"))
    model = Transformer(cfg).eval()
    fp32 = cast_for_decode(model, torch.float32, pack=False)
    spec = _decode_spec(fp32.blocks[1].ffn)
    assert all(block_step(b, torch.float32, spec) is None for b in fp32.blocks)  # plain fp32 weights
    bf16 = cast_for_decode(model, torch.bfloat16)
    assert block_step(bf16.blocks[1], torch.bfloat16, None) is None  # router the fused call cannot reproduce
    gelu = cast_for_decode(nn.ModuleList([DenseMLP(64, 96, "gelu")]), torch.bfloat16)[0]
    assert fused_ffn(gelu, torch.bfloat16) is None
    gated = cast_for_decode(nn.ModuleList([GatedDenseMLP(64, 96, "swiglu")]), torch.bfloat16)[0]
    assert fused_ffn(gated, torch.bfloat16) is None  # its own sigmoid gate
    odd = quantize_model(cast_for_decode(model, torch.bfloat16, pack=False), bits=4, group_size=128, only="all")
    assert fused_ffn(odd.blocks[0].ffn, torch.bfloat16) is None  # K = 64 padded to the group of 128
    assert FastDecoder(bf16, 2, 20).ffn_steps == [None, None]  # batched decoding keeps the dispatch


def test_fused_decoder_greedy_tokens_equal_reference_generation_on_int8() -> None:
    """End to end through fast_generate: the fused int8 decoder's greedy tokens equal `generate`
    on the same quantized model (fp32 activations: only summation order differs)."""
    from moelab.infer.fast_decode import fast_generate
    from moelab.infer.generate import SamplingParams, generate

    torch.manual_seed(0)
    cfg = tiny_config(d_model=64, ffn_hidden=96, moe=tiny_moe(expert_hidden=64, placement="first_k_dense"))
    model = decode_copy(Transformer(cfg).eval(), "int8-fp32")
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_new_tokens=8)
    ref = [c.token_ids for c in generate(copy.deepcopy(model), prompts, params)]
    got = [fast_generate(model, [p], params)[0].token_ids for p in prompts]
    assert got == ref


@pytest.fixture(params=["default", "no-vnni", "generic"])
def native_build(request, monkeypatch):
    """Run on the default build (AVX-512, VNNI, BF16 where the CPU has them), one without VNNI and a generic one."""
    import warnings

    import moelab.native.fused as nf
    import moelab.native.qmatmul as nq
    from moelab.native import build

    flags = {"default": (), "no-vnni": ("-mno-avx512vnni",), "generic": ("-mno-avx512f",)}[request.param]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lib = build.library(flags)
    if lib is None:
        pytest.skip(f"build {request.param!r} unavailable")
    monkeypatch.setattr(nf, "library", lambda: lib)
    monkeypatch.setattr(nq, "library", lambda: lib)
    return request.param


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_attention_equals_the_attention_module(native_build, variant: str) -> None:
    """Norm, projections, RoPE, cache write, attention over every cached position and the residual,
    against the module path on the same cache, position after position."""
    from moelab.infer.fused import attention_step
    from moelab.model.kv_cache import make_cache

    torch.manual_seed(0)
    cfg = tiny_config(d_model=64, n_heads=4, n_kv_heads=2)
    model = decode_copy(Transformer(cfg).eval(), variant)
    act = model.embed.weight.dtype
    block = model.blocks[0]
    step = attention_step(block, model.cfg, act)
    assert step is not None
    fused_cache, ref_cache = make_cache("static", model, 1, 8), make_cache("static", model, 1, 8)
    for pos in range(5):
        x = torch.randn(1, 1, 64).to(act)
        rope = model.rope(torch.tensor([[pos]]))
        ref = x + block.attn(block.attn_norm(x), rope, None, False, ref_cache[0])
        got = x.clone()
        step(got, rope, fused_cache[0])
        assert fused_cache[0].length == ref_cache[0].length == pos + 1
        t = 5 * tol(variant)
        torch.testing.assert_close(fused_cache[0].k[:, :, : pos + 1].float(), ref_cache[0].k[:, :, : pos + 1].float(), rtol=t, atol=t)
        torch.testing.assert_close(got.float(), ref.float(), rtol=t, atol=t)


@pytest.mark.parametrize("variant", ["bf16", "int8-bf16", "int4-bf16", "int8-fp32"])
def test_fused_steps_on_both_builds_track_the_modules(native_build, variant: str) -> None:
    """Whole decode steps with every block fused (attention and feed-forward, MoE with a shared
    expert), default and generic builds, against the same model's modules."""
    torch.manual_seed(0)
    moe = tiny_moe(num_experts=4, top_k=2, expert_hidden=64, num_shared_experts=1, placement="first_k_dense")
    model = decode_copy(Transformer(tiny_config(d_model=64, ffn_hidden=96, moe=moe)).eval(), variant)
    fused, plain = FastDecoder(model, 1, 16), FastDecoder(model, 1, 16, fused=False)
    assert all(fused.attn_steps) and all(fused.ffn_steps)
    ids = torch.randint(0, 90, (1, 5))
    a, b = fused.prefill(ids), plain.prefill(ids)
    for _ in range(5):
        tok = b.argmax(-1, keepdim=True)
        a, b = fused.step(tok), plain.step(tok)
        torch.testing.assert_close(a.float(), b.float(), rtol=5 * tol(variant), atol=5 * tol(variant))


def test_one_token_with_a_wide_range_of_magnitudes_through_integer_limbs() -> None:
    """The int8/int4 single-row path splits x into integer limbs (VNNI): with fp32 x (three limbs)
    each entry is represented to within 2^-22 of the largest one, so a token whose entries span 30
    binary orders of magnitude multiplies to within 2^-21·max|x|·Σ|w| (+ fp32 summation error)."""
    from moelab.native.qmatmul import interleave_rows, q8_matmul

    torch.manual_seed(0)
    q = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    s = torch.rand(32) + 0.5
    x = torch.randn(1, 64) * torch.logspace(-15, 15, 64, base=2.0)
    x[0, 3] = 0.0
    ref = (x.double() @ (q.double() * s.double()[:, None]).T).float()
    got = q8_matmul(x, interleave_rows(q), s, 32)
    w_abs = (q.double().abs() * s.double()[:, None]).sum(1).float()  # Σ_k |w_nk|
    terms = (x.abs().double() @ (q.double().abs() * s.double()[:, None]).T).float()  # Σ_k |x_k w_nk|
    bound = 2.0**-21 * x.abs().max() * w_abs + 1e-6 * terms
    assert ((got - ref).abs() <= bound).all()
    assert torch.equal(q8_matmul(torch.zeros(1, 64), interleave_rows(q), s, 32), torch.zeros(1, 32))


def test_the_profiler_names_every_fused_call() -> None:
    """A decode step under torch.profiler shows the fused native blocks by name (moelab::attn_res, moe_res,
    ffn_res); without a profiler they are plain calls."""
    from moelab.native.build import library

    if library() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    torch.manual_seed(0)
    moe = tiny_moe(num_experts=4, top_k=2, expert_hidden=64, placement="first_k_dense")
    dec = FastDecoder(decode_copy(Transformer(tiny_config(d_model=64, ffn_hidden=96, moe=moe)).eval(), "bf16"), 1, 12)
    tok = dec.prefill(torch.randint(0, 90, (1, 4))).argmax(-1, keepdim=True)
    with torch.profiler.profile() as prof:
        dec.step(tok)
    names = {e.name for e in prof.events()}
    assert {"moelab::attn_res", "moelab::moe_res", "moelab::ffn_res"} <= names, sorted(n for n in names if "moelab" in n)


def _rows_reference(experts: nn.Module, x_TD: torch.Tensor, token, expert, weight) -> torch.Tensor:
    """Σ over each token's assignments, ascending expert, of round(weight · expert(x_t)), rounding after each add."""
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        first = True
        for a in sorted((a for a in range(len(token)) if token[a] == t), key=lambda a: expert[a]):
            term = experts.forward_expert(int(expert[a]), x_TD[t : t + 1])[0] * weight[a].to(x_TD.dtype)
            y[t] = term if first else y[t] + term
            first = False
    return y


@pytest.mark.parametrize("variant", VARIANTS)
def test_expert_rows_on_awkward_assignments(native_build, variant: str) -> None:
    """One native call for the routed experts of several tokens against the experts' own forward: one
    token, an expert without rows, a token without assignment (dropped), top-1 and top-3 tokens mixed,
    twelve rows on one expert (more than the eight that share the few-row kernels)."""
    from moelab.infer.fused import fused_expert_rows

    torch.manual_seed(0)
    moe = tiny_moe(num_experts=5, top_k=2, expert_hidden=64)
    model = decode_copy(Transformer(tiny_config(d_model=64, moe=moe)).eval(), variant)
    experts = next(b.ffn.experts for b in model.blocks if b.is_moe)
    act = model.embed.weight.dtype
    rows = fused_expert_rows(experts, act)
    assert rows is not None
    cases = {
        "one token": (1, [0, 0], [3, 1], [0.75, 0.25]),
        "mixed": (4, [0, 1, 1, 1, 3, 3], [2, 0, 4, 2, 4, 0], [1.0, 0.5, 0.3, 0.2, 0.9, 0.1]),  # token 2 dropped, expert 1 and 3 idle
        "crowded": (12, list(range(12)), [1] * 12, [0.5 + t / 24 for t in range(12)]),
    }
    for name, (T, token, expert, weight) in cases.items():
        x = torch.randn(T, 64).to(act)
        w = torch.tensor(weight).to(act)
        got = rows(x, torch.tensor(token), torch.tensor(expert), w)
        want = _rows_reference(experts, x, token, expert, w)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol(variant), atol=tol(variant), msg=name)
        if name == "mixed":  # token 2 has no assignment: nothing added
            assert torch.equal(got[2], torch.zeros_like(got[2]))


@pytest.mark.parametrize("variant", ["bf16", "fp32", "int8-bf16", "int4-bf16", "int4-fp32"])
def test_batched_steps_with_expert_rows_equal_the_module_dispatch(native_build, variant: str) -> None:
    """Batched decode steps whose MoE experts run as one native call against the same steps through the
    module's dispatch: the same kernels for the same rows, so bf16 activations agree bitwise; fp32 to
    the fused multiply-add of the weighted sum."""
    torch.manual_seed(0)
    moe = tiny_moe(num_experts=4, top_k=2, expert_hidden=64, num_shared_experts=1)
    model = decode_copy(Transformer(tiny_config(d_model=64, moe=moe)).eval(), variant)
    fused, plain = FastDecoder(model, 5, 20), FastDecoder(model, 5, 20, fused=False)
    assert any(r is not None for r in fused.expert_rows) and not any(plain.expert_rows)
    ids = torch.randint(0, 90, (5, 6))
    a, b = fused.prefill(ids), plain.prefill(ids)
    for _ in range(4):
        tok = b.argmax(-1, keepdim=True)
        a, b = fused.step(tok), plain.step(tok)
        if variant.endswith("fp32"):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b)

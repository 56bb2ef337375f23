"""The decode fast path equals the reference generation and the full forward."""

from __future__ import annotations

import warnings

import pytest
import torch
from tests.helpers import tiny_config, tiny_mla, tiny_moe

from moelab.config import RouterConfig
from moelab.infer.fast_decode import FastDecoder, ModuleRoutingNotice, cast_for_decode, fast_generate
from moelab.infer.generate import SamplingParams, generate
from moelab.model.kv_cache import make_cache
from moelab.model.transformer import Transformer
from moelab.quant.model import prepack, quantize_model

CONFIGS = {
    "moe": lambda: tiny_config(moe=tiny_moe()),
    "dense": lambda: tiny_config(),
    "moe_shared": lambda: tiny_config(moe=tiny_moe(num_shared_experts=1)),
    "mla_moe": lambda: tiny_config(moe=tiny_moe(), mla=tiny_mla()),
}
PROMPTS = [[5, 17, 3, 40, 2, 9], [11, 4], [60, 61, 62, 1]]


def _model(kind: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CONFIGS[kind]()).eval()


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_reference_generate(kind: str, batch: int) -> None:
    model = _model(kind)
    prompts = PROMPTS[:batch]
    params = SamplingParams(max_new_tokens=12)
    ref = generate(model, prompts, params)
    fast = fast_generate(model, prompts, params)
    assert [c.token_ids for c in fast] == [c.token_ids for c in ref]
    assert all(len(c.token_ids) == 12 for c in fast)


def test_seeded_sampling_equals_reference() -> None:
    model = _model("moe")
    params = [SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=s) for s in (1, 2)]
    ref = generate(model, PROMPTS[:2], params)
    fast = fast_generate(model, PROMPTS[:2], params)
    assert [c.token_ids for c in fast] == [c.token_ids for c in ref]


@pytest.mark.parametrize("kind", ["moe", "dense", "mla_moe"])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_logits_equal_full_forward(kind: str, padded: bool) -> None:
    """Feed a fixed continuation step by step; each step's logits equal the full forward's at that position."""
    model = _model(kind, seed=1)
    torch.manual_seed(3)
    B, P, N = 2, 5, 6
    seq = torch.randint(0, 90, (B, P + N))
    mask = torch.ones(B, P, dtype=torch.long)
    if padded:
        mask[1, :2] = 0  # row 1 has a 3-token prompt, left-padded
    dec = FastDecoder(model, B, P + N)
    got = [dec.prefill(seq[:, :P], mask)]
    for t in range(P, P + N - 1):
        got.append(dec.step(seq[:, t : t + 1]))
    full_mask = torch.cat([mask, torch.ones(B, N, dtype=torch.long)], dim=1)
    pos = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(seq, attention_mask=full_mask, position_ids=pos).logits
    for j, logits in enumerate(got):
        torch.testing.assert_close(logits, want[:, P - 1 + j], rtol=0, atol=1e-5)


def test_batch1_moe_step_is_bitwise_the_loop_dispatch() -> None:
    """Batch 1: the selected-experts path sums in the loop dispatch's order, so fp32 is exact."""
    model = _model("moe", seed=2)
    seq = torch.tensor([[7, 8, 9, 10, 11, 12]])
    dec = FastDecoder(model, 1, 6)
    dec.prefill(seq[:, :3])
    make_ref = make_cache("static", model, 1, 6)
    with torch.no_grad():
        model(seq[:, :3], attention_mask=torch.ones(1, 3, dtype=torch.long), cache=make_ref)
        for t in range(3, 6):
            got = dec.step(seq[:, t : t + 1])
            past = torch.ones(1, t, dtype=torch.long)
            ref = model(seq[:, t : t + 1], attention_mask=torch.ones(1, 1, dtype=torch.long),
                        position_ids=torch.tensor([[t]]), cache=make_ref, past_mask=past).logits[:, -1]
            assert torch.equal(got, ref)


def test_static_cache_is_not_reallocated() -> None:
    model = _model("moe")
    dec = FastDecoder(model, 1, 10)
    ptrs = [c.k.data_ptr() for c in dec.cache]
    dec.prefill(torch.tensor([[1, 2, 3]]))
    for t in range(4):
        dec.step(torch.tensor([[4 + t]]))
    assert [c.k.data_ptr() for c in dec.cache] == ptrs
    assert dec.cache.length == 7


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_equal_reference_generate(bits: int) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config(d_model=64, moe=tiny_moe(expert_hidden=64))).eval()
    q = prepack(quantize_model(model, bits=bits, group_size=32))
    params = SamplingParams(max_new_tokens=8)
    for prompts in (PROMPTS[:1], PROMPTS):
        assert [c.token_ids for c in fast_generate(q, prompts, params)] == [
            c.token_ids for c in generate(q, prompts, params)
        ]


def test_bf16_copy_keeps_fp32_rope_and_runs() -> None:
    model = _model("moe")
    b = cast_for_decode(model, torch.bfloat16)
    assert b.rope.inv_freq.dtype == torch.float32 and b.embed.weight.dtype == torch.bfloat16
    assert model.embed.weight.dtype == torch.float32
    out = fast_generate(b, PROMPTS[:1], SamplingParams(max_new_tokens=4))
    assert len(out[0].token_ids) == 4


def test_bench_decode_tiny_run_writes_rows_and_ratios(tmp_path) -> None:
    """Plumbing only (no speed assertion): every (model, impl, dtype, batch) row is there."""
    from moelab.bench_decode import run_decode_bench, write_results
    from moelab.model.twins import dense_twin

    torch.manual_seed(0)
    cfg = tiny_config(d_model=64, moe=tiny_moe(expert_hidden=64))
    moe, dense = Transformer(cfg).eval(), Transformer(dense_twin(cfg, "iso_active")).eval()
    log: list[str] = []
    res = run_decode_bench(moe, dense, dtypes=("bf16", "int8"), batches=(1, 2), prompt=4, new=2, rounds=2, log=log.append)
    assert sum("round 2/2" in line for line in log) == len(res.rows)  # every candidate timed in each round
    assert len(res.rows) == 2 * (2 * 2 + 2 * 2)  # models × (moelab dtypes + transformers dtypes) × batches
    assert all(r.decode_tok_s > 0 and r.weights_mib > 0 for r in res.rows)
    assert len(res.bandwidth_gbs) == 2 and all(b > 0 for b in res.bandwidth_gbs)  # measured before each round
    ours = [r for r in res.rows if r.impl == "moelab"]
    assert all(r.bytes_per_token > 0 and r.of_bound > 0 for r in ours)
    assert all(r.bytes_per_token == 0 for r in res.rows if r.impl == "transformers")
    one = {(r.model, r.dtype): r.bytes_per_token for r in ours if r.batch == 1}
    assert one[("moe", "int8")] < one[("moe", "bf16")]  # int8 reads about half the bytes of bf16
    js, md = write_results(res, tmp_path)
    assert "moelab int8 / moelab bf16 (MoE), batch 1" in js.read_text()
    assert "| moe | transformers | bf16 | 2 |" in md.read_text()


def test_bench_decode_with_llama_cpp_peer_writes_its_rows_and_ratios(tmp_path) -> None:
    """Plumbing only: llama.cpp rows for every (model, dtype, batch) and the moelab / llama.cpp ratios."""
    pytest.importorskip("llama_cpp", reason='llama.cpp peer not installed (pip install -e ".[peer]")')
    from moelab.bench_decode import run_decode_bench, write_results
    from moelab.model.twins import dense_twin

    torch.manual_seed(0)
    cfg = tiny_config(d_model=64, vocab_size=300, moe=tiny_moe(expert_hidden=64))
    moe, dense = Transformer(cfg).eval(), Transformer(dense_twin(cfg, "iso_active")).eval()
    res = run_decode_bench(
        moe, dense, dtypes=("bf16", "int8"), batches=(1, 2), prompt=4, new=2, rounds=1, hf_dtypes=(), log=lambda _: None,
        peer="llama.cpp",
    )  # fmt: skip
    peers = [r for r in res.rows if r.impl == "llama.cpp"]
    assert len(peers) == 2 * 2 * 2 and all(r.decode_tok_s > 0 and r.weights_mib > 0 for r in peers)
    ratios = dict(res.ratios())
    assert "moelab int8 / llama.cpp q8_0 (MoE), batch 2" in ratios and "moelab bf16 / llama.cpp bf16 (dense), batch 1" in ratios
    _, md = write_results(res, tmp_path)
    assert "| moe | llama.cpp | int8 | 2 |" in md.read_text()


def test_bench_decode_cli_rejects_too_long_runs_before_building(capsys) -> None:
    from moelab.cli import main

    assert main(["bench-decode", "--prompt", "1000", "--new", "64", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_seq_len=1024" in err


ROUTER_VARIANTS = {
    "no_renormalize": dict(router=RouterConfig(renormalize=False)),
    "softmax_after_topk": dict(router=RouterConfig(softmax_after_topk=True)),
    "k1": dict(top_k=1),
    "capacity": dict(capacity_factor=1.0),  # not the plain top-k shortcut: goes through route()
    "sigmoid_bias": dict(router=RouterConfig(name="sigmoid_bias")),
}


@pytest.mark.parametrize("variant", list(ROUTER_VARIANTS))
@pytest.mark.filterwarnings("ignore::moelab.infer.fast_decode.ModuleRoutingNotice")  # checked where it is said
def test_batch1_router_shortcut_equals_reference(variant: str) -> None:
    """The single-token top-k shortcut (and the route() path for other routers) picks the same
    experts with the same weights as the reference: greedy tokens and logits equal."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(moe=tiny_moe(**ROUTER_VARIANTS[variant]))).eval()
    params = SamplingParams(max_new_tokens=10)
    ref = generate(model, PROMPTS[:1], params)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fast = fast_generate(model, PROMPTS[:1], params)
    notices = [str(w.message) for w in seen if issubclass(w.category, ModuleRoutingNotice)]
    if variant in ("capacity", "sigmoid_bias"):  # no lone-token shortcut: said in one line, never silently
        assert len(notices) == 1 and ("capacity" in notices[0] or "SigmoidBiasRouter" in notices[0]), notices
    else:
        assert not notices
    assert fast[0].token_ids == ref[0].token_ids
    if variant == "capacity":
        return  # the full forward drops over the whole sequence; a lone decoded token never does
    seq = torch.tensor([PROMPTS[0] + ref[0].token_ids[:4]])
    full = model(seq).logits[0]
    dec = FastDecoder(model, 1, seq.shape[1])
    dec.prefill(seq[:, :6])
    for t in range(6, seq.shape[1]):
        torch.testing.assert_close(dec.step(seq[:, t : t + 1])[0], full[t], rtol=1e-5, atol=1e-5)


def test_bf16_decode_copy_keeps_fp32_routers() -> None:
    model = _model("moe")
    fast = cast_for_decode(model, torch.bfloat16)
    for block, orig in zip(fast.blocks, model.blocks):
        assert block.ffn.router.gate.weight.dtype == torch.float32
        assert torch.equal(block.ffn.router.gate.weight, orig.ffn.router.gate.weight)


def _module_attention(block, x_B1D, rope, mask, cache):
    return block.attn(block.attn_norm(x_B1D), rope, mask, False, cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_batched_one_query_attention_equals_the_module(dtype, padded, monkeypatch) -> None:
    """Batched steps attend one query per row through ``_one_query_attention``: the module itself for
    fp32 models (bitwise), fp32 attention math between the module's own projections for bf16 ones
    (equal to the module's bf16 attention to bf16 rounding)."""
    from moelab.infer import fast_decode

    model = _model("moe", seed=2)
    if dtype == torch.bfloat16:
        model = cast_for_decode(model, dtype, pack=False)
    torch.manual_seed(4)
    B, P, N = 3, 5, 4
    seq = torch.randint(0, 90, (B, P + N))
    mask = torch.ones(B, P, dtype=torch.long)
    if padded:
        mask[2, :3] = 0

    def run() -> list[torch.Tensor]:
        dec = FastDecoder(model, B, P + N)
        out = [dec.prefill(seq[:, :P], mask)]
        out += [dec.step(seq[:, t : t + 1]) for t in range(P, P + N - 1)]
        return [o.float() for o in out]

    ours = run()
    monkeypatch.setattr(fast_decode, "_one_query_attention", _module_attention)
    module = run()
    for a, b in zip(ours, module):
        if dtype == torch.float32:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0.05 * b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_steps_equal_each_row_decoded_alone(dtype) -> None:
    """A batch of rows that share experts (each expert's weights read once for all its rows, the
    native few-row kernels) gives each row the logits it gets decoded alone (batch 1: the fused
    single-row steps), to rounding."""
    model = cast_for_decode(_model("moe", seed=5), dtype)
    torch.manual_seed(6)
    B, P, N = 4, 6, 5
    seq = torch.randint(0, 90, (B, P + N))

    def decode(rows: torch.Tensor) -> torch.Tensor:
        dec = FastDecoder(model, rows.shape[0], P + N)
        out = [dec.prefill(rows[:, :P])] + [dec.step(rows[:, t : t + 1]) for t in range(P, P + N - 1)]
        return torch.stack(out, 1).float()  # [rows, N, V]

    together = decode(seq)
    alone = torch.cat([decode(seq[i : i + 1]) for i in range(B)])
    atol = 1e-4 if dtype == torch.float32 else 0.05 * alone.abs().max().item()
    torch.testing.assert_close(together, alone, rtol=0, atol=atol)
    assert (together.argmax(-1) == alone.argmax(-1)).float().mean() > 0.9

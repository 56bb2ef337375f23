"""Generation: cached decoding equals the full forward pass, batching equals one-by-one,
sampling filters equal transformers' warpers, stop strings / EOS / streaming behave.

The exactness tests run over GQA and MLA (latent KV cache) models, dense and MoE."""

from __future__ import annotations

import pytest
import torch

from moelab.config import ConfigError
from moelab.errors import UserError
from moelab.infer.fast_decode import fast_generate
from moelab.infer.generate import SamplingParams, filter_logits, generate, generate_text
from moelab.model.kv_cache import cache_for_config
from moelab.model.transformer import Transformer

from helpers import CharTestTokenizer, tiny_config, tiny_mla, tiny_moe

TOK = CharTestTokenizer()
# model configs (tiny_config overrides) the exactness tests run over: GQA and MLA, dense and MoE
MODELS = {
    "gqa": {},
    "gqa-moe": {"moe": tiny_moe()},
    "gqa-moe-shared-top1": {"moe": tiny_moe(num_shared_experts=1, top_k=1)},
    "mla": {"mla": tiny_mla()},
    "mla-qlora-moe-shared": {"mla": tiny_mla(q_lora_rank=10), "moe": tiny_moe(num_shared_experts=1)},
}


def _model(moe=None, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(moe=moe, **kw)).eval()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 90, (n,), generator=g).tolist() for n in (5, 9, 1, 7)]


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_left_padded_cached_decode_equals_full_forward_every_step(arch: str, kind: str) -> None:
    """Every row of a left-padded batch, decoded step by step from the cache, gets the logits
    of an unpadded full forward pass of that row alone (fp32, ≤ 1e-5)."""
    model = _model(**MODELS[arch])
    cfg = model.cfg
    B, n_new = 3, 6
    lengths = [4, 8, 2]
    seqs = [torch.randint(0, 90, (n + n_new,)) for n in lengths]
    P = max(lengths)
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, P - n :], mask[b, P - n :] = seqs[b][:n], 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = cache_for_config(kind, cfg, B, P + n_new)
    with torch.no_grad():
        step_logits = [model(ids, attention_mask=mask, position_ids=pos, cache=cache).logits[:, -1]]
        for t in range(n_new):
            tok = torch.stack([s[n + t] for s, n in zip(seqs, lengths)]).view(B, 1)
            one = torch.ones(B, 1, dtype=torch.long)
            step_logits.append(
                model(tok, attention_mask=one, position_ids=pos[:, -1:] + 1 + t, cache=cache, past_mask=mask).logits[:, -1]
            )
            mask = torch.cat([mask, one], dim=1)
        for b, n in enumerate(lengths):
            full = model(seqs[b].view(1, -1)).logits[0]
            for t, logits in enumerate(step_logits):
                assert torch.allclose(logits[b], full[n - 1 + t], atol=1e-5), (b, t)


def _greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("arch", MODELS)
def test_greedy_generation_equals_argmax_of_full_forward(arch: str) -> None:
    model = _model(**MODELS[arch])
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    for prompt in _prompts():
        (out,) = generate(model, [prompt], params)
        assert out.token_ids == _greedy_without_cache(model, prompt, 8)
        assert out.finish_reason == "length" and out.prompt_tokens == len(prompt)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_batched_generation_equals_one_by_one(arch: str, cache: str) -> None:
    model = _model(**MODELS[arch])
    prompts = _prompts()
    params = [
        SamplingParams(max_new_tokens=10, stop_at_eos=False),
        SamplingParams(max_new_tokens=7, temperature=0.9, seed=3, stop_at_eos=False),
        SamplingParams(max_new_tokens=12, temperature=1.3, top_k=5, seed=4, stop_at_eos=False),
        SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.8, seed=5, stop_at_eos=False),
    ]
    batched = generate(model, prompts, params, TOK, cache=cache)
    for prompt, p, got in zip(prompts, params, batched):
        (alone,) = generate(model, [prompt], p, TOK, cache=cache)
        assert got.token_ids == alone.token_ids and got.text == alone.text
    assert [len(c.token_ids) for c in batched] == [10, 7, 12, 4]


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    model = _model(tiny_moe())
    prompt = [_prompts()[0]]
    runs = {s: generate(model, prompt, SamplingParams(20, temperature=1.5, seed=s, stop_at_eos=False))[0].token_ids for s in (1, 1, 2)}
    assert generate(model, prompt, SamplingParams(20, temperature=1.5, seed=1, stop_at_eos=False))[0].token_ids == runs[1]
    assert runs[1] != runs[2]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.6), (0.8, 7, 0.9)])
def test_filters_equal_transformers_warpers(temperature: float, top_k: int, top_p: float) -> None:
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(3, 50) * 3
    ref = lp.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = lp.TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = lp.TopPLogitsWarper(top_p)(None, ref)
    ours = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert torch.allclose(ours[finite], ref[finite], atol=1e-6)


def test_samples_stay_inside_top_k_and_top_p() -> None:
    logits = torch.randn(40) * 2
    top5 = set(logits.topk(5).indices.tolist())
    g = torch.Generator().manual_seed(0)
    from moelab.infer.generate import sample_token

    for _ in range(200):
        assert sample_token(logits, SamplingParams(temperature=2.0, top_k=5), g) in top5
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    for _ in range(200):
        assert sample_token(logits, SamplingParams(temperature=1.0, top_p=0.5), g) in nucleus


def test_stop_strings_eos_and_streaming() -> None:
    model = _model(tiny_moe())
    prompt = "The cat "
    (free,) = generate_text(model, TOK, [prompt], SamplingParams(24, temperature=1.0, seed=7, stop_at_eos=False))
    assert len(free.token_ids) == 24 and len(set(free.text)) > 5
    stop = free.text[10:13]
    cut = free.text.find(stop)
    pieces: list[str] = []
    (stopped,) = generate_text(model, TOK, [prompt], SamplingParams(24, temperature=1.0, seed=7, stop=(stop,)), on_text=lambda r, d: pieces.append(d))
    assert stopped.text == free.text[:cut] and stopped.finish_reason == "stop"
    assert "".join(pieces) == stopped.text and len(pieces) > 1
    # EOS: pretend the token generated at step 5 is EOS; generation ends before it
    eos = free.token_ids[5]
    first = free.token_ids.index(eos)

    class EosTok(CharTestTokenizer):
        eos_id = eos

    (ended,) = generate_text(model, EosTok(), [prompt], SamplingParams(24, temperature=1.0, seed=7))
    assert ended.token_ids == free.token_ids[:first] and ended.finish_reason == "stop"


def test_context_limit_and_errors() -> None:
    model = _model(None)
    long = list(range(60))  # max_seq_len is 64
    (out,) = generate(model, [long], SamplingParams(10, stop_at_eos=False))
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    with pytest.raises(UserError, match="empty"):
        generate(model, [[]], SamplingParams(3))
    with pytest.raises(UserError, match="context"):
        generate(model, [list(range(65))], SamplingParams(3))
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(UserError, match="causal"):
        generate(_model(None, attention="bidirectional"), [[1, 2]], SamplingParams(3))
    V = model.cfg.vocab_size
    for bad in ([1, V], [-1, 2]):  # a tokenizer that does not match the model: one clear error, both paths
        with pytest.raises(UserError, match=f"token id {bad[0] if bad[0] < 0 else V}.*vocabulary of {V}"):
            generate(model, [[1, 2], bad], SamplingParams(3))
        with pytest.raises(UserError, match="outside the model's vocabulary"):
            fast_generate(model, [bad], SamplingParams(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["gqa-moe", "mla-qlora-moe-shared"])
def test_cuda_generation_matches_cpu_logits(arch: str) -> None:
    """On CUDA the static cache and the sampling path give the CPU model's greedy tokens for
    the first steps (fp32; later steps may differ where logits tie within float error)."""
    model = _model(**MODELS[arch])
    prompts = _prompts()
    cpu = generate(model, prompts, SamplingParams(4, stop_at_eos=False))
    gpu = generate(model.cuda(), prompts, SamplingParams(4, stop_at_eos=False))
    assert [c.token_ids[:2] for c in gpu] == [c.token_ids[:2] for c in cpu]


def test_top_p_that_rounds_to_zero_keeps_the_most_likely_token() -> None:
    # Found by the server's fuzz test: top_p=2.98e-154 is 0 in fp32, which removed every token (NaN sampling).
    from moelab.infer.generate import filter_logits

    logits = torch.tensor([0.5, 2.0, -1.0, 1.0])
    out = filter_logits(logits, temperature=1.0, top_k=0, top_p=2.98e-154)
    assert torch.isfinite(out).tolist() == [False, True, False, False]
    assert torch.isfinite(out.softmax(-1)).all()


def test_generate_builds_no_autograd_graph() -> None:
    """Decoding under grad mode (a server worker thread, a training script) must not record a graph."""
    import torch

    from moelab.infer.generate import SamplingParams, generate
    from moelab.model.transformer import Transformer

    from helpers import tiny_config

    model = Transformer(tiny_config())
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    with torch.enable_grad():
        generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=3))
    assert seen and not any(seen)

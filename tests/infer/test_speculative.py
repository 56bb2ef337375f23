"""Speculative decoding: greedy output equals plain greedy decoding token for token, whatever the draft
proposes (a perfect draft, a wrong one, prompt lookup), at every budget edge; the cache rollback is exact;
what cannot be verified token by token is refused."""

from __future__ import annotations

import pytest
import torch

from moelab.errors import UserError
from moelab.infer.generate import SamplingParams, generate
from moelab.infer.speculative import (
    CachedModel,
    ModelDraft,
    PromptLookupDraft,
    speculative_generate,
)
from moelab.model.kv_cache import cache_for_config
from moelab.model.transformer import Transformer

from helpers import CharTestTokenizer, tiny_config, tiny_mla, tiny_moe

TOK = CharTestTokenizer()


def _model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**kw)).eval()


class FixedDraft:
    """Proposes a fixed continuation (or nothing), whatever the context: the verifier must cope."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.calls = 0

    def propose(self, context, k):
        self.calls += 1
        return self.tokens[:k]


def _plain(model, prompt, params):
    return generate(model, [prompt], params, TOK)[0]


def test_prompt_lookup_copies_what_followed_the_most_recent_longest_match() -> None:
    d = PromptLookupDraft(max_ngram=3)
    assert d.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 0, 2, 3], 2) == [7, 8]  # "2 3" last seen before 7 8
    assert d.propose([5, 1, 2, 3, 4, 6, 2, 3, 4], 3) == [6, 2, 3]  # the 3-gram wins over shorter ones
    assert d.propose([1, 2, 3], 4) == []  # no earlier occurrence
    assert d.propose([4], 4) == [] and d.propose([4, 4], 0) == []
    assert d.propose([4, 4], 3) == [4]  # the only earlier 4 is followed by the tail itself
    with pytest.raises(UserError, match="min_ngram"):
        PromptLookupDraft(max_ngram=1, min_ngram=2)


@pytest.mark.parametrize("kind", ["static", "dynamic"])
@pytest.mark.parametrize("arch", [{}, {"mla": tiny_mla(), "moe": tiny_moe()}])
def test_rollback_then_feed_equals_feeding_the_kept_tokens_only(kind: str, arch: dict) -> None:
    model = _model(**arch)
    a, b = CachedModel(model, 20, kind), CachedModel(model, 20, kind)
    a.feed([5, 6, 7])
    a.feed([8, 9, 10, 11])
    a.rollback(4)
    got = a.feed([30, 31])
    b.feed([5, 6, 7, 8])
    want = b.feed([30, 31])
    assert a.tokens == b.tokens == [5, 6, 7, 8, 30, 31]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    cache = cache_for_config(kind, model.cfg, 1, 8)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(1)  # nothing cached yet


@pytest.mark.parametrize("arch", [{"moe": tiny_moe()}, {"moe": tiny_moe(num_shared_experts=1, top_k=1)}])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_output_equals_plain_decoding_with_every_draft(arch: dict, k: int) -> None:
    model = _model(**arch)
    params = SamplingParams(max_new_tokens=15, stop_at_eos=False)
    g = torch.Generator().manual_seed(3)
    for prompt in (torch.randint(0, 90, (6,), generator=g).tolist(), [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]):
        want = _plain(model, prompt, params)
        perfect = ModelDraft(model)  # the model drafting for itself: every draft token accepted
        other = ModelDraft(_model(seed=5))  # another (dense) model: mostly rejected
        for draft in (perfect, other, PromptLookupDraft(), FixedDraft([3] * 9), FixedDraft([])):
            got, stats = speculative_generate(model, prompt, draft, params, draft_tokens=k, tokenizer=TOK)
            assert got.token_ids == want.token_ids, type(draft).__name__
            assert got.finish_reason == want.finish_reason == "length"
            assert stats.tokens == 15 and stats.accepted <= stats.drafted
            assert stats.passes == 15 - stats.accepted  # each pass: its accepted tokens + 1
        _, stats = speculative_generate(model, prompt, ModelDraft(model), params, draft_tokens=k, tokenizer=TOK)
        assert stats.acceptance_rate == 1.0 and stats.passes == 1 + -(-14 // (k + 1))  # the prefill, then k + 1 a pass


def test_budget_edges_eos_and_stop_strings_end_where_plain_decoding_ends() -> None:
    model = _model(moe=tiny_moe())
    prompt = [10, 11, 12, 10, 11]
    long = _plain(model, prompt, SamplingParams(max_new_tokens=30, stop_at_eos=False)).token_ids
    for n_new in (0, 1, 2, 5):
        params = SamplingParams(max_new_tokens=n_new, stop_at_eos=False)
        got, _ = speculative_generate(model, prompt, ModelDraft(model), params, draft_tokens=4, tokenizer=TOK)
        assert got.token_ids == long[:n_new] and got.finish_reason == "length"
    # the model's context ends before max_new_tokens: both stop at max_seq_len (64)
    near_end = [1] * 60
    params = SamplingParams(max_new_tokens=50, stop_at_eos=False)
    got, _ = speculative_generate(model, near_end, ModelDraft(model), params, draft_tokens=4, tokenizer=TOK)
    assert got.token_ids == _plain(model, near_end, params).token_ids and len(got.token_ids) == 4

    class EosAt(CharTestTokenizer):
        eos_id = long[6]  # the 7th token of the plain output plays EOS

    tok = EosAt()
    params = SamplingParams(max_new_tokens=30)
    want = generate(model, [prompt], params, tok)[0]
    got, stats = speculative_generate(model, prompt, ModelDraft(model), params, draft_tokens=4, tokenizer=tok)
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "stop"
    assert long.index(tok.eos_id) == len(got.token_ids) and stats.tokens == len(got.token_ids) + 1

    stop = TOK.decode(long[8:10])
    params = SamplingParams(max_new_tokens=30, stop=(stop,), stop_at_eos=False)
    want = generate(model, [prompt], params, TOK)[0]
    streamed: list[str] = []
    got, _ = speculative_generate(model, prompt, PromptLookupDraft(), params, draft_tokens=3, tokenizer=TOK,
                                  on_text=lambda row, delta: streamed.append(delta))  # fmt: skip
    assert (got.text, got.finish_reason) == (want.text, "stop") and "".join(streamed) == want.text


def test_what_cannot_be_verified_token_by_token_is_refused() -> None:
    model = _model(moe=tiny_moe())
    with pytest.raises(UserError, match="greedy"):
        speculative_generate(model, [1, 2], PromptLookupDraft(), SamplingParams(temperature=0.7))
    with pytest.raises(UserError, match="draft_tokens"):
        speculative_generate(model, [1, 2], PromptLookupDraft(), draft_tokens=0)
    with pytest.raises(UserError, match="vocabulary"):
        speculative_generate(model, [1, 2], ModelDraft(_model(vocab_size=50)))
    with pytest.raises(UserError, match="capacity"):
        speculative_generate(_model(moe=tiny_moe(capacity_factor=1.0)), [1, 2], PromptLookupDraft())
    with pytest.raises(UserError, match="causal"):
        speculative_generate(_model(attention="bidirectional"), [1, 2], PromptLookupDraft())

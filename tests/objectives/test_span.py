"""T5 span corruption: exact inverse (property test), noise density and span length, batch layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.config import ConfigError
from moelab.data.tokenizer import BytesTokenizer
from moelab.errors import UserError
from moelab.objectives import build_objective
from moelab.objectives.span import corrupt_spans, random_spans_noise_mask, reconstruct_spans, span_counts


def _tok(n: int = 100) -> BytesTokenizer:
    tok = BytesTokenizer()
    build_objective("span", num_sentinels=n).prepare_tokenizer(tok)
    return tok


TOK = _tok()


@settings(max_examples=150, deadline=None)
@given(
    length=st.integers(2, 300),
    batch=st.integers(1, 3),
    density=st.floats(0.01, 0.6),
    mean=st.floats(1.0, 8.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_inputs_and_targets_reconstruct_the_block(length, batch, density, mean, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 259, (batch, length), generator=g)  # bytes and BOS/EOS/PAD: any non-sentinel id
    obj = build_objective("span", noise_density=density, mean_span_length=mean)
    _, k = span_counts(length, density, mean)
    if k > 100:
        return
    b = obj.prepare(ids, None, TOK, g)
    assert (b.input_ids.shape[1], b.labels.shape[1]) == obj.lengths(length)
    sentinels = TOK.sentinel_ids()
    for row in range(batch):
        inputs, targets = b.input_ids[row].tolist(), b.labels[row].tolist()
        assert inputs[-1] == TOK.eos_id and targets[-1] == TOK.eos_id
        assert targets[0] == sentinels[0]
        assert [t for t in inputs if t in sentinels] == sentinels[:k]  # span i ↔ sentinel i, in order
        assert [t for t in targets if t in sentinels] == sentinels[:k]
        assert reconstruct_spans(inputs, targets, sentinels) == ids[row].tolist()
        src = b.source_positions[row]
        kept = src >= 0
        assert torch.equal(b.input_ids[row][kept], ids[row][src[kept]])  # kept tokens map back to the block
        assert torch.isin(b.input_ids[row][~kept], torch.tensor([*sentinels, TOK.eos_id])).all()
    assert torch.equal(b.decoder_input_ids[:, 1:], b.labels[:, :-1])
    assert (b.decoder_input_ids[:, 0] == TOK.pad_id).all()  # T5: decoder start token = pad


def test_counts_follow_t5() -> None:
    # T5's random_spans_helper: 568 raw tokens at density 0.15, mean span 3 → 512 inputs, 114 targets
    # (85 noise tokens in 28 spans: 568 - 85 + 28 + 1 = 512 and 85 + 28 + 1 = 114).
    assert span_counts(568, 0.15, 3.0) == (85, 28)
    assert build_objective("span").lengths(568) == (512, 114)
    assert span_counts(10, 0.15, 3.0) == (2, 1)  # round(1.5) = 2 noise tokens, one span
    assert span_counts(2, 0.9, 1.0) == (1, 1)  # at least one kept token


def test_noise_density_and_mean_span_length_match_the_settings() -> None:
    g = torch.Generator().manual_seed(0)
    S, rows = 512, 400
    noise = torch.stack([random_spans_noise_mask(S, 0.15, 3.0, g) for _ in range(rows)])
    assert abs(noise.float().mean().item() - 0.15) <= 1 / S
    starts = noise & ~torch.cat([torch.zeros(rows, 1, dtype=torch.bool), noise[:, :-1]], dim=1)
    mean_span = noise.sum().item() / starts.sum().item()
    assert abs(mean_span - 3.0) < 0.1, mean_span
    # Span lengths vary (not all 3) and the spans are spread over the block, as T5's layout implies:
    # a kept run first, a span last, noise roughly uniform over positions in between.
    run_lengths = torch.tensor([len(r) for r in _runs(noise[0])])
    assert run_lengths.unique().numel() > 2
    assert not noise[:, 0].any() and noise[:, -1].all()
    per_quarter = noise[:, 16:-16].float().reshape(rows, 4, -1).mean((0, 2))
    assert ((per_quarter - 0.15).abs() < 0.02).all(), per_quarter


def _runs(row: torch.Tensor) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, v in enumerate(row.tolist()):
        if v and (i == 0 or not row[i - 1]):
            runs.append([])
        if v:
            runs[-1].append(i)
    return runs


def test_paper_example_layout() -> None:
    # "Thank you for inviting me to your party last week ." with "for inviting" and "last" dropped.
    words = ["Thank", "you", "for", "inviting", "me", "to", "your", "party", "last", "week", "."]
    vocab = {w: i for i, w in enumerate(words)}
    ids = torch.tensor([[vocab[w] for w in words]])
    noise = torch.tensor([[w in ("for", "inviting", "last") for w in words]])
    X, Y = 100, 99  # two sentinels
    inputs, targets = corrupt_spans(ids, noise, torch.tensor([X, Y]), eos_id=-1)
    name = {**{i: w for w, i in vocab.items()}, X: "<X>", Y: "<Y>", -1: "</s>"}
    assert [name[t] for t in inputs[0].tolist()] == [
        "Thank",
        "you",
        "<X>",
        "me",
        "to",
        "your",
        "party",
        "<Y>",
        "week",
        ".",
        "</s>",
    ]
    assert [name[t] for t in targets[0].tolist()] == ["<X>", "for", "inviting", "<Y>", "last", "</s>"]


def test_too_few_sentinels_is_a_user_error() -> None:
    with pytest.raises(UserError, match="num_sentinels"):
        build_objective("span").prepare(torch.randint(0, 256, (1, 200)), None, _tok(3), None)


@pytest.mark.parametrize("kw", [{"noise_density": 0.0}, {"mean_span_length": 0.5}, {"num_sentinels": 0}])
def test_bad_settings_are_config_errors(kw) -> None:
    with pytest.raises(ConfigError, match="objective"):
        build_objective("span", **kw)

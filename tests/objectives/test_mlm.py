"""BERT masking statistics (Devlin et al. 2019 §3.1) on >= 100k tokens, labels, metrics."""

from __future__ import annotations

import pytest
import torch

from moelab.config import IGNORE_INDEX, ConfigError
from moelab.data.tokenizer import BytesTokenizer
from moelab.objectives import build_objective


@pytest.fixture(scope="module")
def masked():
    tok = BytesTokenizer()
    obj = build_objective("mlm")
    obj.prepare_tokenizer(tok)
    build_objective("span", num_sentinels=3).prepare_tokenizer(tok)  # more specials that must never be chosen
    g = torch.Generator().manual_seed(0)
    B, S = 200, 1024  # 204,800 tokens
    ids = torch.randint(0, 256, (B, S), generator=g)
    special_pos = torch.rand(B, S, generator=g) < 0.1  # 10% specials (EOS/PAD/BOS/mask/sentinels)
    specials = torch.tensor(tok.special_ids())
    ids[special_pos] = specials[torch.randint(0, len(specials), (int(special_pos.sum()),), generator=g)]
    batch = obj.prepare(ids, None, tok, torch.Generator().manual_seed(1))
    return tok, ids, special_pos, batch


def test_fifteen_percent_of_regular_tokens_are_chosen_and_specials_never(masked) -> None:
    _tok, ids, special_pos, batch = masked
    chosen = batch.labels != IGNORE_INDEX
    eligible = ~special_pos
    assert int(eligible.sum()) >= 100_000
    rate = chosen[eligible].float().mean().item()
    assert abs(rate - 0.15) < 0.005, rate
    assert not chosen[special_pos].any()
    assert torch.equal(batch.labels[chosen], ids[chosen])  # label = the original token, no shift
    assert torch.equal(batch.input_ids[~chosen], ids[~chosen])  # nothing else is touched


def test_eighty_ten_ten(masked) -> None:
    tok, ids, _, batch = masked
    chosen = batch.labels != IGNORE_INDEX
    inp, orig = batch.input_ids[chosen], ids[chosen]
    n = chosen.sum().item()
    to_mask = (inp == tok.mask_id).float().sum().item() / n
    unchanged = (inp == orig).float().sum().item() / n
    random = ((inp != orig) & (inp != tok.mask_id)).float().sum().item() / n
    # A random replacement equals the original with chance 1/256: expected unchanged = 0.1 + 0.1/256.
    assert (
        abs(to_mask - 0.8) < 0.01 and abs(unchanged - (0.1 + 0.1 / 256)) < 0.01 and abs(random - 0.1) < 0.01
    )
    replaced = inp[(inp != orig) & (inp != tok.mask_id)]
    assert not torch.isin(replaced, torch.tensor(tok.special_ids())).any()  # random tokens are regular
    assert len(replaced.unique()) > 200  # ... and spread over the vocabulary


def test_seeded_generator_reproduces_the_batch() -> None:
    tok = BytesTokenizer()
    obj = build_objective("mlm")
    obj.prepare_tokenizer(tok)
    ids = torch.randint(0, 256, (4, 64))
    a = obj.prepare(ids, None, tok, torch.Generator().manual_seed(3))
    b = obj.prepare(ids, None, tok, torch.Generator().manual_seed(3))
    c = obj.prepare(ids, None, tok, torch.Generator().manual_seed(4))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)


def test_every_row_with_regular_tokens_gets_a_target() -> None:
    tok = BytesTokenizer()
    obj = build_objective("mlm", mask_prob=1e-6)
    obj.prepare_tokenizer(tok)
    ids = torch.randint(0, 256, (8, 5))
    ids[3] = tok.eos_id  # a row of specials only: nothing can be chosen
    batch = obj.prepare(ids, None, tok, torch.Generator().manual_seed(0))
    per_row = (batch.labels != IGNORE_INDEX).sum(1)
    assert per_row[3] == 0 and (per_row[[0, 1, 2, 4, 5, 6, 7]] == 1).all()


def test_masked_accuracy_and_loss_are_computed_over_chosen_positions_only() -> None:
    obj = build_objective("mlm")
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 1], [2, IGNORE_INDEX, IGNORE_INDEX, 0]])
    logits = torch.randn(2, 4, 5)
    from moelab.objectives import ObjectiveBatch

    batch = ObjectiveBatch(input_ids=torch.zeros(2, 4, dtype=torch.long), labels=labels)
    keep = labels != IGNORE_INDEX
    expected_acc = (logits.argmax(-1)[keep] == labels[keep]).float().mean().item()
    logp = torch.log_softmax(logits, -1)[keep]
    expected_loss = -logp[torch.arange(4), labels[keep]].mean().item()  # written out: mean of -log p(label)
    m = obj.evaluate(logits, batch)
    assert m["masked_accuracy"] == pytest.approx(expected_acc)
    assert m["masked_loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert m["tokens"] == 4


@pytest.mark.parametrize(
    "kw", [{"mask_prob": 0.0}, {"mask_prob": 1.5}, {"mask_token_frac": 0.95, "random_token_frac": 0.1}]
)
def test_bad_settings_are_config_errors(kw) -> None:
    with pytest.raises(ConfigError, match="objective"):
        build_objective("mlm", **kw)

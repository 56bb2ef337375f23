"""Prefix-LM: the loss ignores the prefix; bidirectional inside the prefix, causal after it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.config import IGNORE_INDEX, ConfigError
from moelab.data.tokenizer import BytesTokenizer
from moelab.errors import UserError
from moelab.model.transformer import Transformer
from moelab.objectives import build_objective

from helpers import tiny_config

TOK = BytesTokenizer()


def _batch(B=4, S=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(0, 97, (B, S + 1), generator=g)
    ids, labels = block[:, :-1], block[:, 1:].clone()
    labels[:, 3] = IGNORE_INDEX  # a loader -100 (after an EOS) must survive
    return ids, labels, build_objective("prefix").prepare(ids, labels, TOK, g)


def test_labels_are_ignored_inside_the_prefix_only() -> None:
    ids, labels, b = _batch()
    S = ids.shape[1]
    assert ((b.prefix_len >= 1) & (b.prefix_len <= S - 1)).all()
    for row in range(ids.shape[0]):
        P = int(b.prefix_len[row])
        # position i predicts token i+1: targets inside the prefix (i < P-1) are dropped.
        assert (b.labels[row, : P - 1] == IGNORE_INDEX).all()
        assert torch.equal(b.labels[row, P - 1 :], labels[row, P - 1 :])
    lengths = torch.cat([_batch(8, 16, s)[2].prefix_len for s in range(50)])
    assert lengths.unique().numel() == 15  # uniform over 1..15: every length occurs


def test_loss_ignores_the_prefix_and_attention_follows_the_prefix() -> None:
    ids, _, b = _batch(B=2, S=12)
    b.prefix_len = torch.tensor([5, 8])  # fixed, to place the edits below
    P = b.prefix_len
    b.labels[0, :4], b.labels[1, :7] = IGNORE_INDEX, IGNORE_INDEX
    torch.manual_seed(0)
    model = Transformer(tiny_config(attention="prefix")).eval()
    out = model(**b.model_inputs())
    # The loss, written out: mean CE over the suffix targets only; no gradient reaches prefix logits.
    logits = out.logits.detach().requires_grad_(True)
    keep = b.labels != IGNORE_INDEX
    by_hand = F.cross_entropy(logits[keep], b.labels[keep])
    assert torch.allclose(out.loss, by_hand)
    by_hand.backward()
    for row in range(2):
        assert logits.grad[row, : P[row] - 1].abs().sum() == 0
        assert logits.grad[row, P[row] - 1 :].abs().sum() > 0
    # Changing a prefix token changes earlier prefix positions; a suffix token never changes earlier ones.
    with torch.no_grad():
        base = out.logits
        in_prefix = ids.clone()
        in_prefix[:, 4] = (in_prefix[:, 4] + 1) % 97
        changed = model(in_prefix, prefix_len=P).logits
        assert not torch.allclose(changed[:, 0], base[:, 0], atol=1e-5)
        suffix = ids.clone()
        suffix[:, 9] = (suffix[:, 9] + 1) % 97
        changed = model(suffix, prefix_len=P).logits
        assert torch.allclose(changed[:, :9], base[:, :9], atol=1e-6)


def test_prefix_metric_is_the_target_loss_with_bits_per_byte() -> None:
    _ids, _, b = _batch()
    logits = torch.randn(*b.labels.shape, 300)
    keep = b.labels != IGNORE_INDEX
    m = build_objective("prefix").evaluate(logits, b, torch.ones(300, dtype=torch.long))
    ce = F.cross_entropy(logits[keep], b.labels[keep])
    assert m["target_loss"] == pytest.approx(ce.item(), rel=1e-6)
    assert m["bpb"] == pytest.approx(
        ce.item() / torch.log(torch.tensor(2.0)).item(), rel=1e-6
    )  # 1 byte/token


def test_errors() -> None:
    with pytest.raises(ConfigError, match="min_prefix"):
        build_objective("prefix", min_prefix=0)
    with pytest.raises(UserError, match="seq_len"):
        build_objective("prefix", min_prefix=4).prepare(torch.zeros(1, 4, dtype=torch.long), None, TOK)

"""Contract over the objective registry, causal pass-through, pure metrics, end to end with models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moelab.config import IGNORE_INDEX, ConfigError
from moelab.data.synthetic import synthetic_documents
from moelab.data.tokenizer import BytesTokenizer, train_bpe
from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from moelab.model.transformer import Transformer
from moelab.objectives import OBJECTIVES, ObjectiveBatch, build_objective, metrics

from helpers import tiny_config, tiny_moe


def test_registry_has_the_four_objectives() -> None:
    assert list(OBJECTIVES) == ["causal", "mlm", "prefix", "span"]
    with pytest.raises(ConfigError, match="unknown objective"):
        build_objective("nope")
    with pytest.raises(ConfigError, match="mask_prob"):
        build_objective("mlm", mask_probability=0.2)


def _model(obj, vocab: int, moe=None):
    torch.manual_seed(0)
    if obj.architecture == "encoder_decoder":
        return EncoderDecoder(EncoderDecoderConfig.from_model(tiny_config(vocab_size=vocab, moe=moe)))
    return Transformer(tiny_config(vocab_size=vocab, attention=obj.attention, moe=moe))


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("moe", [None, tiny_moe()])
def test_every_objective_trains_its_model(name, moe) -> None:
    """prepare → model(**model_inputs()) → finite loss, gradients, metrics; seeded = reproducible."""
    obj = build_objective(name, **({"num_sentinels": 8} if name == "span" else {}))
    tok = obj.prepare_tokenizer(BytesTokenizer())
    obj.check_tokenizer(tok)
    block = torch.randint(0, 256, (3, 33))
    block[:, 10] = tok.eos_id
    ids, labels = block[:, :-1], block[:, 1:].clone()
    labels[ids == tok.eos_id] = IGNORE_INDEX
    b = obj.prepare(ids, labels, tok, torch.Generator().manual_seed(0))
    again = obj.prepare(ids, labels, tok, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, again.model_inputs()[k]) for k, v in b.model_inputs().items())
    assert b.num_targets > 0 and b.labels.dtype == torch.long
    model = _model(obj, tok.vocab_size, moe)
    out = model(**b.model_inputs())
    assert out.logits.shape[:2] == b.labels.shape and torch.isfinite(out.total_loss)
    out.total_loss.backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
    m = obj.evaluate(out.logits.detach(), b, metrics.token_bytes(tok))
    assert obj.metric in m and math.isfinite(m[obj.metric])
    assert m["loss"] == pytest.approx(out.loss.item(), rel=1e-5)  # the metric's loss is the model's loss


def test_causal_passes_the_loader_batch_through() -> None:
    tok = BytesTokenizer()
    ids = torch.randint(0, 256, (2, 8))
    labels = torch.randint(0, 256, (2, 8))
    b = build_objective("causal").prepare(ids, labels, tok)
    assert b.input_ids is ids and b.labels is labels and b.model_inputs().keys() == {"input_ids", "labels"}
    derived = build_objective("causal").prepare(ids, None, tok).labels
    assert torch.equal(derived[:, :-1], ids[:, 1:]) and (derived[:, -1] == IGNORE_INDEX).all()


def test_sums_add_up_over_batches_like_one_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 11)
    labels = torch.randint(0, 11, (6, 5))
    labels[torch.rand(6, 5) < 0.5] = IGNORE_INDEX
    tb = torch.randint(0, 4, (11,))
    total: dict[str, float] = {}
    for part in (slice(0, 1), slice(1, 4), slice(4, 6)):
        sums = {
            **metrics.loss_sums(logits[part], labels[part]),
            **metrics.accuracy_sums(logits[part], labels[part]),
        }
        metrics.add_sums(total, {**sums, **metrics.byte_sums(labels[part], tb)})
    keep = labels != IGNORE_INDEX
    ce = F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
    s = metrics.summarize(total)
    assert s["loss"] == pytest.approx(ce / keep.sum().item(), rel=1e-6)
    assert s["accuracy"] == pytest.approx((logits.argmax(-1)[keep] == labels[keep]).float().mean().item())
    assert s["bpb"] == pytest.approx(ce / math.log(2) / tb[labels[keep]].sum().item(), rel=1e-6)
    assert math.isnan(metrics.summarize({"loss_sum": 0.0, "tokens": 0.0})["loss"])


def test_token_bytes_count_the_text_bytes() -> None:
    text = "sort: 3 1 2 -> 1 2 3 größer ✓"
    bpe = train_bpe((d.text for d in synthetic_documents(20, seed=0)), vocab_size=300)
    build_objective("mlm").prepare_tokenizer(bpe)
    for tok in (BytesTokenizer(), bpe):
        tb = metrics.token_bytes(tok)
        ids = tok.encode(text)
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))
        assert (tb[tok.special_ids()] == 0).all()


def test_objective_batch_moves_and_counts() -> None:
    b = ObjectiveBatch(input_ids=torch.zeros(1, 3, dtype=torch.long), labels=torch.tensor([[1, -100, 2]]))
    assert b.num_targets == 2 and b.to("cpu").labels.tolist() == [[1, -100, 2]]

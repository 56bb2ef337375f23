"""Loader blocks → objective → model → metrics: a few optimizer steps lower each objective's loss."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from moelab.data.loader import pack
from moelab.data.synthetic import synthetic_documents
from moelab.data.tokenizer import BytesTokenizer
from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from moelab.model.transformer import Transformer
from moelab.objectives import OBJECTIVES, build_objective
from moelab.objectives.metrics import add_sums, token_bytes

from helpers import tiny_config, tiny_moe


@pytest.fixture(scope="module")
def docs():
    return synthetic_documents(20, seed=0)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_training_on_packed_blocks_improves_the_headline_metric(name, docs) -> None:
    torch.manual_seed(0)
    objective = build_objective(name, **({"num_sentinels": 8} if name == "span" else {}))
    tokenizer = objective.prepare_tokenizer(BytesTokenizer())
    data = pack(docs, tokenizer, seq_len=48)
    cfg = tiny_config(vocab_size=tokenizer.vocab_size, moe=tiny_moe())
    if objective.architecture == "encoder_decoder":
        model = EncoderDecoder(EncoderDecoderConfig.from_model(cfg))
    else:
        model = Transformer(replace(cfg, attention=objective.attention))
    tb = token_bytes(tokenizer)

    def evaluate() -> dict[str, float]:
        model.eval()
        gen, sums = torch.Generator().manual_seed(123), {}
        with torch.no_grad():
            for start in range(0, 32, 16):
                batch = data.batch(list(range(start, start + 16)))
                ob = objective.prepare(batch.input_ids, batch.labels, tokenizer, gen)
                add_sums(sums, objective.metric_sums(model(**ob.model_inputs()).logits, ob, tb))
        model.train()
        return objective.summarize(sums)

    before = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = data.batch(torch.randint(0, data.num_blocks, (16,), generator=gen).tolist())
        ob = objective.prepare(batch.input_ids, batch.labels, tokenizer, gen)
        loss = model(**ob.model_inputs()).total_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert math.isfinite(after[objective.metric])
    if name == "mlm":
        assert after["masked_accuracy"] > before["masked_accuracy"] + 0.05

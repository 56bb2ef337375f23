"""`moelab eval` / ``evaluate_checkpoint``: every document of ``--data``, counted, with bits per byte."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moelab.cli import main
from moelab.config import RunConfig, run_preset
from moelab.data.document import Document
from moelab.data.loader import eval_batches, pack
from moelab.data.tokenizer import BytesTokenizer
from moelab.errors import UserError
from moelab.experiment.evaluate import (
    BlockBatches,
    eval_objective,
    evaluate_checkpoint,
    format_result,
    pad_to_blocks,
)
from moelab.model.transformer import Transformer
from moelab.objectives.metrics import token_bytes
from moelab.train.evaluation import evaluate

CAP = 600  # the run's data.max_bytes_per_domain, below a third of each domain of the --data file
TRAIN = [
    "--preset", "smoke", "--set", "data.corpus=synthetic", "--set", "data.synthetic_docs=6",
    "--set", f"data.max_bytes_per_domain={CAP}", "--set", "train.steps=2", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOELAB_CACHE", str(out / "cache"))
        assert main(["train", *TRAIN, "--out", str(out / "run")]) == 0
    return out / "run"


def _corpus(path: Path) -> list[dict]:
    """Three domains of 16 documents each (~2,300 characters a domain, over 3 × CAP), non-ASCII included."""
    recs = []
    for d, word in enumerate(["alpha", "béta", "γάμμα"]):
        for i in range(16):
            recs.append(
                {
                    "text": f"{word} {i}: " + " ".join(f"{word}{(i * j) % 7}" for j in range(20)),
                    "domain": f"d{d}",
                }
            )
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return recs


def _predicted_bytes(recs: list[dict], seq_len: int) -> tuple[int, dict[str, int]]:
    """(targets, UTF-8 bytes of the targets per domain), written out from the packing rules independently of
    the loader: the stream is every document's bytes then EOS, padded with EOS to blocks of seq_len+1; in a
    block token i predicts token i+1 unless token i is EOS (so a target never crosses into another document);
    EOS, a special token, has no bytes."""
    eos = None
    stream: list[tuple[int | None, str]] = []
    for r in recs:
        stream.extend((b, r["domain"]) for b in r["text"].encode("utf-8"))
        stream.append((eos, r["domain"]))
    L = seq_len + 1
    stream += [(eos, "")] * (-len(stream) % L)
    targets, nbytes = 0, {}
    for start in range(0, len(stream), L):
        block = stream[start : start + L]
        for (inp, domain), (lab, _) in itertools.pairwise(block):
            if inp is not eos:
                targets += 1
                nbytes[domain] = nbytes.get(domain, 0) + (lab is not eos)
    return targets, nbytes


def test_eval_data_uses_every_document_and_reports_bits_per_byte(run, tmp_path, capsys) -> None:
    recs = _corpus(tmp_path / "notes.jsonl")
    assert all(sum(len(r["text"]) for r in recs if r["domain"] == d) > 3 * CAP for d in ("d0", "d1", "d2"))
    assert main(["eval", str(run), "--data", str(tmp_path / "notes.jsonl"), "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    # the run's cap would keep ~5 of the 16 documents of each domain
    assert result["documents"] == result["documents_in_corpus"] == len(recs)
    assert result["split"] == "all" and result["max_bytes_per_domain"] is None
    tokens, nbytes = _predicted_bytes(recs, seq_len=64)
    total_bytes = sum(nbytes.values())
    assert result["tokens"] == tokens and result["bytes"] == total_bytes
    assert math.isfinite(result["bpb"]) and result["bpb"] > 0
    assert result["bpb"] == pytest.approx(result["loss"] * tokens / (math.log(2) * total_bytes), rel=1e-9)
    assert set(result["bpb_by"]["domain"]) == {"d0", "d1", "d2"} == set(result["loss_by"]["domain"])
    assert sum(result["tokens_by"]["domain"].values()) == tokens
    for d in ("d0", "d1", "d2"):  # the same identity on each domain's own targets
        nats_d = result["loss_by"]["domain"][d] * result["tokens_by"]["domain"][d]
        assert result["bpb_by"]["domain"][d] == pytest.approx(nats_d / (math.log(2) * nbytes[d]), rel=1e-9)


def test_max_bytes_per_domain_caps_only_when_asked(run, tmp_path) -> None:
    recs = _corpus(tmp_path / "notes.jsonl")
    result = evaluate_checkpoint(run, data=str(tmp_path / "notes.jsonl"), max_bytes_per_domain=CAP)
    assert result["documents_in_corpus"] == len(recs)
    assert 3 <= result["documents"] < len(recs) and result["max_bytes_per_domain"] == CAP
    assert set(result["loss_by"]["domain"]) == {"d0", "d1", "d2"}  # the cap is per domain: each keeps some
    assert "capped at 600 bytes per domain" in format_result(result)
    with pytest.raises(UserError, match="--max-bytes-per-domain caps a --data corpus"):
        evaluate_checkpoint(run, max_bytes_per_domain=CAP)
    with pytest.raises(UserError, match="--batches 0"):
        evaluate_checkpoint(run, batches=0)


def test_validation_split_matches_the_run_and_prints_counts(run, capsys) -> None:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in recs if r["kind"] == "eval"][-1]
    result = evaluate_checkpoint(run)
    assert result["split"] == "validation" and result["data"] == "synthetic"
    assert result["loss"] == pytest.approx(final["val_loss"], rel=1e-6)  # the blocks the trainer scored
    assert result["tokens"] == final["val_tokens"]
    assert 0 < result["documents"] <= result["documents_in_corpus"] < 30  # the validation documents only
    assert math.isfinite(result["bpb"])
    text = format_result(result)
    assert f"documents {result['documents']:,} of {result['documents_in_corpus']:,}" in text
    assert f"tokens {result['tokens']:,}" in text and f"bpb {result['bpb']:.4f}" in text
    by_domain = result["bpb_by"]["domain"]
    assert all(f"{v:.4f}" in text for v in by_domain.values()) and "validation split of synthetic" in text
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert capsys.readouterr().out.strip() == text


def _tiny_model(vocab: int) -> Transformer:
    cfg = run_preset("smoke").model
    torch.manual_seed(0)
    return Transformer(replace(cfg, vocab_size=vocab))


def test_evaluate_bits_per_byte_overall_and_per_label() -> None:
    tok = BytesTokenizer()
    docs = [
        Document("a", "ascii only text " * 5, {"domain": "en"}),
        Document("b", "ünïcödé wörds " * 5, {"domain": "de"}),
        Document("c", "καλημέρα κόσμε " * 4, {"domain": "el"}),
    ]
    data = pack(docs, tok, seq_len=16)
    batches = eval_batches(data, 4)
    model = _tiny_model(tok.vocab_size)
    plain = evaluate(model, batches, data.label_names)
    r = evaluate(model, batches, data.label_names, token_bytes_V=token_bytes(tok))
    assert plain.bpb is None and plain.bpb_by == {} and r.loss == pytest.approx(plain.loss, rel=1e-12)
    # independent sums: nats and bytes of every scored position, by domain
    V = tok.vocab_size
    nats: dict[str, float] = {}
    nbytes: dict[str, int] = {}
    with torch.no_grad():
        for b in batches:
            logp = torch.log_softmax(model(b.input_ids).logits.double(), -1)
            for i, j in (b.labels != -100).nonzero().tolist():
                lab = int(b.labels[i, j])
                dom = data.label_names["domain"][int(b.label_ids["domain"][i, j])]
                nats[dom] = nats.get(dom, 0.0) - float(logp[i, j, lab])
                nbytes[dom] = nbytes.get(dom, 0) + (1 if lab < 256 else 0)
    assert V == 259 and r.num_bytes == sum(nbytes.values())
    assert r.bpb == pytest.approx(sum(nats.values()) / math.log(2) / sum(nbytes.values()), rel=1e-5)
    assert set(r.bpb_by["domain"]) == set(nats)
    for dom in nats:
        assert r.bpb_by["domain"][dom] == pytest.approx(nats[dom] / math.log(2) / nbytes[dom], rel=1e-5)
    assert r.documents == 3


def test_padding_keeps_the_last_document_and_changes_no_other_target() -> None:
    tok = BytesTokenizer()
    docs = [Document(str(i), "x" * 40 + str(i), {"domain": "d"}) for i in range(3)] + [
        Document("last", "end", {})
    ]
    data = pack(docs, tok, seq_len=16)
    padded = pad_to_blocks(data)
    assert padded.num_tokens % 17 == 0 and padded.num_blocks == data.num_blocks + 1
    full, cut = eval_batches(padded, 64)[0], eval_batches(data, 64)[0]
    n = cut.labels.shape[0]
    assert torch.equal(full.labels[:n], cut.labels)  # the unpadded blocks score the same targets
    last = full.labels[n:][full.labels[n:] != -100]
    # the dropped tail is now scored: "end" minus its first letter, which follows an EOS (never a target)
    assert bytes(last[last < 256].tolist()).decode().endswith("2nd")
    assert (
        full.doc_ids[full.labels != -100].unique().numel(),
        cut.doc_ids[cut.labels != -100].unique().numel(),
    ) == (4, 3)


def test_block_batches_are_the_loaders_eval_batches_made_lazily() -> None:
    tok = BytesTokenizer()
    data = pack([Document(str(i), f"document {i} " * 9, {"domain": "d"}) for i in range(12)], tok, seq_len=16)
    for max_batches in (None, 2):
        lazy, eager = BlockBatches(data, 4, max_batches), eval_batches(data, 4, max_batches)
        assert len(lazy) == len(eager) > 1
        assert all(
            torch.equal(a.input_ids, b.input_ids) and torch.equal(a.doc_ids, b.doc_ids)
            for a, b in zip(lazy, eager)
        )


def test_eval_objective_rules() -> None:
    cfg = RunConfig()
    assert eval_objective(cfg).name == cfg.train.objective == "causal"
    assert eval_objective(cfg, "causal").name == "causal"
    with pytest.raises(UserError, match="needs a different model"):
        eval_objective(cfg, "mlm")
    with pytest.raises(UserError, match="needs a different model"):
        eval_objective(cfg, "span")


@pytest.mark.parametrize("objective", ["prefix", "mlm"])
def test_other_objectives_count_documents_and_bpb(tmp_path, monkeypatch, objective) -> None:
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", *TRAIN, "--objective", objective, "--out", str(out)]) == 0
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    result = evaluate_checkpoint(out)
    assert result["objective"] == objective and result["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert 0 < result["documents"] <= result["documents_in_corpus"]
    if objective == "prefix":  # bytes of its target suffixes: the objective's own bits per byte
        assert math.isfinite(result["bpb"]) and result["bpb"] == result["metrics"]["bpb"]
    else:  # masked tokens are scattered single pieces: no bits per byte
        assert result["bpb"] is None and "bpb n/a" in format_result(result)
    recs = _corpus(tmp_path / "notes.jsonl")
    on_file = evaluate_checkpoint(out, data=str(tmp_path / "notes.jsonl"))
    assert on_file["documents_in_corpus"] == len(recs)
    assert on_file["documents"] >= len(recs) - 1  # not padded for these objectives: the tail may drop one

"""convert → quantize → generate chains (issue 26): a sentencepiece-only tokenizer becomes tokenizer.json, the
conversion commands take run folders as generate does, and an encoder–decoder is refused by generate in one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moelab.checkpoint.folder import checkpoint_name
from moelab.checkpoint.state import save_checkpoint
from moelab.cli import main
from moelab.config import DataConfig, ModelConfig, RunConfig
from moelab.convert import tokenizer_files
from moelab.convert.hf import load_moelab
from moelab.data.tokenizer import BytesTokenizer, load_tokenizer
from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from moelab.model.transformer import Transformer

from helpers import one_line, tiny_config, tiny_moe

TEXT = "the quick brown fox jumps over the lazy dog, said the fox to the dog."



@pytest.fixture
def sentencepiece_folder(tmp_path) -> Path:
    """A tiny Mixtral saved by transformers in bf16 with a sentencepiece ``tokenizer.model`` and no tokenizer.json."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    pytest.importorskip("transformers")
    from convert.hf_cases import tiny_hf_model

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{TEXT} {i} times" for i in range(200)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=61, model_type="bpe", unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    hf = tmp_path / "hf"
    tiny_hf_model("mixtral").to(torch.bfloat16).save_pretrained(hf)  # vocabulary 61, as the tokenizer
    (tmp_path / "sp.model").rename(hf / "tokenizer.model")
    return hf


def test_convert_quantize_generate_with_a_sentencepiece_tokenizer(sentencepiece_folder, tmp_path, capsys) -> None:
    import sentencepiece

    hf, ml, q = sentencepiece_folder, tmp_path / "ml", tmp_path / "q"
    assert main(["convert", str(hf), str(ml)]) == 0
    assert "(with tokenizer.json, tokenizer.model)" in capsys.readouterr().out
    ours = load_tokenizer(ml / "tokenizer.json")
    theirs = sentencepiece.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    assert ours.encode(TEXT) == theirs.encode(TEXT) and ours.eos_id == 2 and ours.bos_id == 1
    assert load_moelab(ml).embed.weight.dtype == torch.bfloat16  # the source's dtype, not fp32
    assert main(["quantize", str(ml), "--bits", "8", "--out", str(q)]) == 0
    assert "quantized 2 modules" in capsys.readouterr().out
    assert main(["generate", str(q), "--prompt", "the quick", "--max-tokens", "4", "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["completions"][0]
    assert out["completion_tokens"] == 4 and out["prompt_tokens"] == len(theirs.encode("the quick"))
    # the Hugging Face folder itself generates too: its tokenizer.model is read in memory
    assert main(["generate", str(hf), "--prompt", "the quick", "--max-tokens", "2", "--ignore-eos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completions"][0]["completion_tokens"] == 2


def test_without_sentencepiece_the_reason_is_one_line(sentencepiece_folder, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(tokenizer_files, "can_convert_sentencepiece", lambda: False)
    assert main(["convert", str(sentencepiece_folder), str(tmp_path / "ml")]) == 0
    captured = capsys.readouterr()
    assert "(with tokenizer.model)" in captured.out
    assert "pip install sentencepiece protobuf" in captured.err and "has no tokenizer.json" in captured.err
    assert main(["generate", str(tmp_path / "ml"), "--prompt", "hi"]) == 2
    assert "pip install sentencepiece protobuf" in one_line(capsys)


def _run_folder(tmp_path: Path, moe: bool) -> Path:
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=259, moe=tiny_moe() if moe else None)).eval()
    cfg = RunConfig(model=model.cfg, data=DataConfig(seq_len=32))
    run = tmp_path / ("moe-run" if moe else "dense-run")
    for step in (1, 2):
        save_checkpoint(run / "checkpoints" / checkpoint_name(step), model, cfg, BytesTokenizer(), train_state={"step": step})
    return run


def test_conversion_commands_take_a_run_folder(tmp_path, capsys) -> None:
    dense, moe = _run_folder(tmp_path, moe=False), _run_folder(tmp_path, moe=True)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 100)
    data = ["--data", str(text), "--batches", "1", "--seq-len", "16"]
    commands = [
        ["upcycle", str(dense), "--experts", "4", "--out", str(tmp_path / "up")],
        ["moefy", str(dense), "--experts", "4", "--top-k", "2", *data, "--out", str(tmp_path / "mf")],
        ["prune", str(moe), "--remove", "1", *data, "--out", str(tmp_path / "pr")],
        ["merge", str(moe), "--experts", "2", "--out", str(tmp_path / "mg")],
        ["convert", str(moe), str(tmp_path / "hf"), "--family", "mixtral"],
    ]
    for argv in commands:
        assert main(argv) == 0, argv
        assert "(with tokenizer.json)" in capsys.readouterr().out or argv[0] == "convert"
    assert load_moelab(tmp_path / "up").cfg.moe.num_experts == 4
    assert load_moelab(tmp_path / "pr").cfg.moe.num_experts == 3
    assert load_moelab(tmp_path / "mg").cfg.moe.num_experts == 2
    assert (tmp_path / "hf" / "config.json").is_file()
    # the newest checkpoint was read: the output keeps clear of the whole run, as generate's outputs do
    assert main(["upcycle", str(dense), "--out", str(dense / "up")]) == 2
    assert "lies inside the source" in one_line(capsys)


def test_generate_refuses_an_encoder_decoder_in_one_line(tmp_path, capsys) -> None:
    stack = ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=4, ffn_hidden=48, max_seq_len=64)
    cfg = EncoderDecoderConfig(encoder=replace(stack, attention="bidirectional"), decoder=stack)
    save_checkpoint(tmp_path / "ckpt", EncoderDecoder(cfg), cfg, BytesTokenizer())
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "hi"]) == 2
    line = one_line(capsys)
    assert "encoder–decoder (EncoderDecoder)" in line and "moelab eval" in line

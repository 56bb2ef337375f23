"""CLI: convert, upcycle, moefy, merge, prune run end to end on tiny models."""

from __future__ import annotations

import pytest
import torch

from moelab.cli import main
from moelab.config import ModelConfig
from moelab.convert.hf import load_moelab, save_moelab
from moelab.model.transformer import Transformer


@pytest.fixture
def dense_dir(tmp_path):
    model = Transformer(
        ModelConfig(
            vocab_size=256,
            d_model=32,
            n_layers=2,
            n_heads=4,
            ffn_hidden=64,
            max_seq_len=64,
            tie_embeddings=False,
        )
    )
    save_moelab(model, tmp_path / "dense")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return tmp_path


def test_upcycle_export_convert_back(dense_dir, capsys) -> None:
    d = dense_dir
    assert main(["upcycle", str(d / "dense"), "--experts", "4", "--top-k", "2", "--out", str(d / "moe")]) == 0
    assert main(["convert", str(d / "moe"), str(d / "hf"), "--family", "mixtral"]) == 0
    assert (d / "hf" / "config.json").is_file()
    assert main(["convert", str(d / "hf"), str(d / "back")]) == 0
    a, b = load_moelab(d / "moe"), load_moelab(d / "back")
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-6)
    assert (
        main(
            [
                "prune",
                str(d / "moe"),
                "--remove",
                "1",
                "--data",
                str(d / "text.txt"),
                "--batches",
                "1",
                "--seq-len",
                "16",
                "--out",
                str(d / "pruned"),
            ]
        )
        == 0
    )
    assert load_moelab(d / "pruned").cfg.moe.num_experts == 3
    assert main(["merge", str(d / "moe"), "--experts", "2", "--out", str(d / "merged")]) == 0
    assert load_moelab(d / "merged").cfg.moe.num_experts == 2


def test_moefy_reports_losses(dense_dir, capsys) -> None:
    d = dense_dir
    args = [
        "moefy",
        str(d / "dense"),
        "--experts",
        "4",
        "--top-k",
        "2",
        "--data",
        str(d / "text.txt"),
        "--batches",
        "1",
        "--seq-len",
        "16",
    ]
    assert main([*args, "--out", str(d / "mf")]) == 0
    out = capsys.readouterr().out
    assert "dense loss" in out and "k=4" in out and "k=1" in out
    assert load_moelab(d / "mf").cfg.moe.top_k == 2


def test_convert_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist: give a model folder" in err
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no complete checkpoint" in err


def test_written_folders_carry_the_tokenizer_and_generate_from_them(tmp_path, capsys) -> None:
    """upcycle → convert keep the source's tokenizer, so `moelab generate` runs on what they wrote."""
    from moelab.data.tokenizer import BytesTokenizer, train_bpe

    model = Transformer(ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=64))
    save_moelab(model, tmp_path / "dense")
    BytesTokenizer().save(tmp_path / "dense")
    assert main(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--out", str(tmp_path / "moe")]) == 0
    assert "(with tokenizer.json)" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "moe"), "--prompt", "hi", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("hi")
    # a bytes tokenizer is moelab's own format: an HF export leaves it out
    assert main(["convert", str(tmp_path / "moe"), str(tmp_path / "hf"), "--family", "mixtral"]) == 0
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    # a BPE tokenizer.json is a HF file: it goes with the HF export
    bpe = train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=259)
    bpe.save(tmp_path / "moe")
    assert main(["convert", str(tmp_path / "moe"), str(tmp_path / "hf2"), "--family", "mixtral"]) == 0
    assert (tmp_path / "hf2" / "tokenizer.json").read_text() == (tmp_path / "moe" / "tokenizer.json").read_text()
    assert main(["generate", str(tmp_path / "hf2"), "--prompt", "the fox", "--max-tokens", "3"]) == 0
    capsys.readouterr()
    (tmp_path / "moe" / "tokenizer.json").unlink()
    assert main(["generate", str(tmp_path / "moe"), "--prompt", "hi"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err

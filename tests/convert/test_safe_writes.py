"""convert, upcycle, moefy, merge, prune: never onto their source, never over a folder without
--overwrite, never over files moelab did not write, and never a half-written folder (issue 25)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moelab.convert.hf as hf
from moelab.cli import main
from moelab.config import ModelConfig
from moelab.convert.hf import load_moelab, save_moelab
from moelab.data.tokenizer import BytesTokenizer
from moelab.errors import UserError
from moelab.model.transformer import Transformer

from helpers import one_line, snapshot, tiny_moe


def _model(moe=None) -> Transformer:
    cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=64, moe=moe)
    return Transformer(cfg)


@pytest.fixture
def folders(tmp_path) -> Path:
    for name, moe in (("dense", None), ("moe", tiny_moe())):
        save_moelab(_model(moe), tmp_path / name)
        BytesTokenizer().save(tmp_path / name)
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    return tmp_path




def _argv(command: str, d: Path, out: Path) -> list[str]:
    data = ["--data", str(d / "text.txt"), "--seq-len", "16", "--batches", "1"]
    return {
        "convert": ["convert", str(d / "moe"), str(out), "--to", "moelab"],
        "upcycle": ["upcycle", str(d / "dense"), "--experts", "4", "--out", str(out)],
        "moefy": ["moefy", str(d / "dense"), "--experts", "4", "--top-k", "2", *data, "--out", str(out)],
        "merge": ["merge", str(d / "moe"), "--experts", "2", "--out", str(out)],
        "prune": ["prune", str(d / "moe"), "--remove", "1", *data, "--out", str(out)],
    }[command]


COMMANDS = ["convert", "upcycle", "moefy", "merge", "prune"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_non_empty_output_is_refused_and_left_alone(folders, capsys, command) -> None:
    out = folders / "out"
    save_moelab(_model(), out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert main(_argv(command, folders, out)) == 2
    line = one_line(capsys)
    assert "already exists and is not empty" in line and "--overwrite" in line
    assert main([*_argv(command, folders, out), "--overwrite"]) == 2
    assert "holds notes.txt, which moelab did not write" in one_line(capsys)
    assert snapshot(out) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_inside_its_source_is_refused(folders, capsys, command) -> None:
    src = folders / ("dense" if command in ("upcycle", "moefy") else "moe")
    before = snapshot(src)
    assert main([*_argv(command, folders, src / "sub"), "--overwrite"]) == 2
    assert "lies inside the source" in one_line(capsys)
    assert main([*_argv(command, folders, src), "--overwrite"]) == 2
    assert "is the source" in one_line(capsys)
    assert snapshot(src) == before


def test_overwrite_replaces_an_earlier_model_folder(folders, capsys) -> None:
    out = folders / "out"
    assert main(["upcycle", str(folders / "dense"), "--experts", "2", "--out", str(out)]) == 0
    assert main(["upcycle", str(folders / "dense"), "--experts", "4", "--out", str(out), "--overwrite"]) == 0
    assert load_moelab(out).cfg.moe.num_experts == 4
    assert main(["convert", str(out), str(out.parent / "hf"), "--family", "mixtral"]) == 0
    assert main(["convert", str(out), str(out.parent / "hf"), "--to", "moelab", "--overwrite"]) == 0
    assert sorted(p.name for p in (out.parent / "hf").iterdir()) == ["config.yaml", "model.safetensors", "tokenizer.json"]


def test_a_failed_write_leaves_no_folder_behind(folders, capsys, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "copy_tokenizer", broken)  # after the weights are written
    with pytest.raises(OSError, match="disk full"):
        main(["upcycle", str(folders / "dense"), "--experts", "4", "--out", str(folders / "moe4")])
    assert sorted(p.name for p in folders.iterdir()) == ["dense", "moe", "text.txt"]  # no output, no temporary
    save_moelab(_model(), folders / "old")
    before = snapshot(folders / "old")
    with pytest.raises(OSError, match="disk full"):
        main(["upcycle", str(folders / "dense"), "--experts", "4", "--out", str(folders / "old"), "--overwrite"])
    assert snapshot(folders / "old") == before  # the old output is kept whole


def test_library_writers_replace_their_own_folders_but_nothing_else(tmp_path) -> None:
    a, b = _model(), _model()
    with torch.no_grad():
        b.embed.weight.add_(1.0)
    save_moelab(a, tmp_path / "m")
    save_moelab(b, tmp_path / "m")  # a re-export, as scripts do
    assert torch.equal(load_moelab(tmp_path / "m").embed.weight, b.embed.weight)
    (tmp_path / "m" / "README.md").write_text("mine")
    with pytest.raises(UserError, match=r"README\.md"):
        hf.export_hf(a, tmp_path / "m", family="llama")
    assert (tmp_path / "m" / "README.md").read_text() == "mine"

"""`moelab train --init PATH`: start a run from existing weights; bad inputs are one-line exit-2 errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelab.checkpoint.folder import read_run_config, resolve_checkpoint
from moelab.cli import main
from moelab.convert.hf import load_moelab, save_moelab
from moelab.convert.load import load_model
from moelab.data.tokenizer import BytesTokenizer, load_tokenizer
from moelab.model.transformer import Transformer

from helpers import tiny_config

FAST = [
    "--preset",
    "smoke",
    "--set",
    "data.corpus=synthetic",
    "--set",
    "data.synthetic_docs=6",
    "--no-progress",
]
SHORT = ["--set", "train.steps=2", "--set", "train.eval_batches=1", "--set", "train.batch_size=2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("moelab train: error: --init"), err
    for n in needles:
        assert n in err, err
    return err


def moelab_folder(path: Path, vocab_size: int = 259) -> Path:
    torch.manual_seed(1)
    return save_moelab(Transformer(tiny_config(vocab_size=vocab_size)), path)


def test_init_from_run_folder_starts_from_its_weights_and_run_config(tmp_path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["train", *FAST, *SHORT, "--out", a]) == 0
    # no --preset: data/train come from a's checkpoint; a vanishing lr keeps the weights, so b ends where a ended
    assert main(["train", "--init", a, "--set", "train.lr=1e-12", "--out", b, "--no-progress"]) == 0
    before, _ = load_model(a)
    after, tok = load_model(b)
    sa, sb = before.state_dict(), after.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.allclose(sa[k], sb[k], rtol=0, atol=1e-8) for k in sa)  # a fresh init differs by ~1e-2
    ra, rb = read_run_config(resolve_checkpoint(a)), read_run_config(resolve_checkpoint(b))
    assert rb.data == ra.data and rb.model == ra.model
    assert rb.train.steps == 2 and rb.train.lr == 1e-12
    assert tok.vocab_size == 259


def test_init_from_hf_folder_uses_its_tokenizer(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    hf = tmp_path / "llama"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(hf)
    BytesTokenizer().save(hf / "tokenizer.json")
    run = tmp_path / "run"
    # data.tokenizer=bpe would train a new tokenizer; the folder's tokenizer.json wins
    assert (
        main(["train", "--init", str(hf), *FAST, *SHORT, "--set", "data.tokenizer=bpe", "--out", str(run)])
        == 0
    )
    tok = load_tokenizer(resolve_checkpoint(run) / "tokenizer.json")
    assert isinstance(tok, BytesTokenizer)
    assert read_run_config(resolve_checkpoint(run)).model.d_model == 32


def test_init_missing_folder(tmp_path, capsys) -> None:
    assert main(["train", "--init", str(tmp_path / "nope"), *FAST, *SHORT]) == 2
    one_line_error(capsys, "does not exist")


def test_init_folder_without_a_model(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["train", "--init", str(tmp_path / "empty"), *FAST, *SHORT]) == 2
    one_line_error(capsys, "neither a model folder")


def test_init_shape_mismatch(tmp_path, capsys) -> None:
    src = moelab_folder(tmp_path / "m")
    d = tiny_config().d_model
    argv = [
        "train",
        "--init",
        str(src),
        *FAST,
        *SHORT,
        "--set",
        f"model.d_model={2 * d}",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 2
    one_line_error(capsys, "does not fit", f"has shape [259, {d}]", f"needs [259, {2 * d}]")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_init_data_config_that_does_not_fit_the_model(tmp_path, capsys) -> None:
    src = moelab_folder(tmp_path / "m")  # max_seq_len 64
    assert main(["train", "--init", str(src), *FAST, *SHORT, "--set", "data.seq_len=128"]) == 2
    one_line_error(capsys, "data.seq_len=128", "max_seq_len", "--set")


def test_init_vocab_mismatch_without_tokenizer(tmp_path, capsys) -> None:
    src = moelab_folder(tmp_path / "m", vocab_size=101)
    assert main(["train", "--init", str(src), *FAST, *SHORT, "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "vocab_size 101", "259")


def test_init_with_a_vocabulary_padded_beyond_the_tokenizer_keeps_its_rows(tmp_path) -> None:
    """Released models pad their embedding (OLMoE: 50,304 rows, 50,280 tokens); the rows stay, unused."""
    src = moelab_folder(tmp_path / "m", vocab_size=320)
    assert main(["train", "--init", str(src), *FAST, *SHORT, "--out", str(tmp_path / "r")]) == 0
    model, tok = load_model(tmp_path / "r")
    assert tok.vocab_size == 259 and model.embed.weight.shape[0] == 320


def test_init_stop_and_resume_equals_one_go(tmp_path) -> None:
    """With --resume the run's own checkpoint wins over --init; the split run matches the one-go run."""
    src = str(moelab_folder(tmp_path / "m"))
    steps = [*FAST, *SHORT, "--set", "train.steps=3", "--set", "data.seq_len=32", "--set", "train.lr=0.001"]
    one, split = str(tmp_path / "one"), str(tmp_path / "split")
    assert main(["train", "--init", src, *steps, "--out", one]) == 0
    assert main(["train", "--init", src, *steps, "--out", split, "--stop-after", "1"]) == 0
    assert main(["train", "--init", src, *steps, "--out", split, "--resume"]) == 0
    a, _ = load_model(one)
    b, _ = load_model(split)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    source = load_moelab(
        src
    ).state_dict()  # started from it (close) and trained (not equal); fresh init: ~1e-1 away
    drift = max(float((sa[k] - source[k]).abs().max()) for k in sa if sa[k].is_floating_point())
    assert 0 < drift < 0.02


def test_init_set_fits_the_data_to_the_source_model(tmp_path) -> None:
    """`tiny` has data.seq_len 128 > the source's max_seq_len 64: `--set data.seq_len=32` makes it fit."""
    src = str(moelab_folder(tmp_path / "m"))
    fit = ["--set", "data.corpus=synthetic", "--set", "data.synthetic_docs=6", "--set", "data.tokenizer=bytes"]
    argv = ["train", "--init", src, "--preset", "tiny", *fit, *SHORT, "--set", "data.seq_len=32", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 0
    cfg = read_run_config(resolve_checkpoint(tmp_path / "r"))
    assert cfg.data.seq_len == 32 and cfg.model == tiny_config(vocab_size=259)

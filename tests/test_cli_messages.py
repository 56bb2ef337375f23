"""Issue 25, sizes and messages: each input that used to end in a traceback, an allocation of the
whole machine or a misleading line now gets one line on stderr and exit code 2 (one test per
defect). Free memory is patched small wherever a model could otherwise be built."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moelab.calc import arch_from_config, count
from moelab.cli import main
from moelab.config import DataConfig, RunConfig, TrainConfig

from helpers import tiny_config, tiny_moe


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    """Run ``moelab ARGV`` in-process: exit code 2, one stderr line holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def free_memory(monkeypatch):
    """The memory guard sees ``n`` free bytes: ``free_memory(n)``."""
    from moelab.hardware import AvailableMemory
    from moelab.model import memory_guard

    monkeypatch.delenv(memory_guard.ALLOW_ENV, raising=False)

    def set_free(n: int) -> None:
        monkeypatch.setattr(memory_guard, "available_memory", lambda device="cpu": AvailableMemory(n, "test"))

    return set_free


# ----------------------------------------------------------------------------- sizes


def test_config_counts_without_building_the_model(monkeypatch, capsys) -> None:
    """`moelab config --set moe.num_experts=100000` built the model to count it (9.9 GB RSS)."""
    from moelab.model.transformer import Transformer

    def refuse(self, cfg) -> None:
        raise AssertionError("moelab config built the model")

    monkeypatch.setattr(Transformer, "__init__", refuse)
    assert main(["config", "--preset", "tiny", "--set", "moe.num_experts=100000"]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    from moelab.config import apply_overrides, preset

    p = count(arch_from_config(apply_overrides(preset("tiny"), ["moe.num_experts=100000"])))
    assert f"total {p.total - p.embedding:,}" in out


def test_train_refuses_a_run_too_big_for_memory_before_preparing_data(free_memory, capsys, tmp_path) -> None:
    """`train` with 100,000 experts would exhaust the machine. The corpus does not exist either: the
    size check comes first, so no data is prepared and no model is built."""
    free_memory(2**30)
    argv = ["train", "--preset", "smoke", "--set", "moe.num_experts=100000", "--set", "data.corpus=/nonexistent/c.txt",
            "--out", str(tmp_path / "run")]
    one_line_error(capsys, argv, "training this model needs at least", "AdamW moments", "MOELAB_ALLOW_LARGE=1")
    assert not (tmp_path / "run").exists()


def test_allow_large_skips_the_check_for_one_command(free_memory, capsys, tmp_path) -> None:
    from moelab.model.memory_guard import ALLOW_ENV

    free_memory(1)
    argv = ["train", "--preset", "smoke", "--set", "data.corpus=/nonexistent/c.txt", "--out", str(tmp_path / "run")]
    one_line_error(capsys, argv, "training this model needs at least")
    err = one_line_error(capsys, [*argv, "--allow-large"], "does not exist")  # on to the data: the corpus is missing
    assert "needs at least" not in err
    assert ALLOW_ENV not in os.environ


def test_upcycle_cannot_allocate_a_model_bigger_than_memory(free_memory, capsys, tmp_path) -> None:
    """Every path that builds a model passes the builder's guard: here upcycling a dense folder."""
    from moelab.convert.hf import save_moelab
    from moelab.model.sizes import parameter_count
    from moelab.model.transformer import Transformer

    dense = tiny_config()
    save_moelab(Transformer(dense), tmp_path / "dense")
    free_memory(parameter_count(dense) * 4 + 1)  # the dense model fits, 64 experts of it do not
    one_line_error(capsys, ["upcycle", str(tmp_path / "dense"), "--experts", "64", "--out", str(tmp_path / "moe")],
                   "parameters", "more than the", "free on cpu")
    assert not (tmp_path / "moe").exists()


# ----------------------------------------------------------------------------- files


def test_non_utf8_config_file_names_the_file_and_the_byte_offset(capsys, tmp_path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"d_model: 64\n# caf\xe9\n")
    for command in ("config", "train"):
        one_line_error(capsys, [command, "--config", str(bad)], str(bad), "not UTF-8", "0xe9 at offset 17")


def test_binary_prompt_file_is_not_utf8_text(capsys, tmp_path) -> None:
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes([0x80, 0x81, 0xFF, 0x00]) * 8)
    one_line_error(capsys, ["generate", "ckpt", "--prompt-file", str(binary)], "prompt file", "is not UTF-8 text")
    nul = tmp_path / "zeros.bin"
    nul.write_bytes(b"\x00" * 16)  # decodes as UTF-8, still binary
    one_line_error(capsys, ["generate", "ckpt", "--prompt-file", str(nul)], "NUL byte at offset 0")


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_dev_null_is_described_not_reported_missing(capsys, tmp_path) -> None:
    err = one_line_error(capsys, ["generate", "ckpt", "--prompt-file", "/dev/null"], "not a regular file",
                         "character device")
    assert "does not exist" not in err
    one_line_error(capsys, ["config", "--config", "/dev/null"], "not a regular file", "character device")
    one_line_error(capsys, ["generate", "ckpt", "--prompt-file", str(tmp_path)], "it is a directory")
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    one_line_error(capsys, ["generate", "ckpt", "--prompt-file", str(empty)], "holds no prompt")


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_config_file_is_refused_not_read_as_defaults(capsys, tmp_path, text: str) -> None:
    empty = tmp_path / "cfg.yaml"
    empty.write_text(text)
    for command in ("config", "train"):
        one_line_error(capsys, [command, "--config", str(empty)], "holds no settings", "'{}'")
    empty.write_text("{}\n")  # every default, said explicitly
    assert main(["config", "--config", str(empty)]) == 0


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("seed", [str(2**64), "-1"])
@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "ckpt", "--prompt", "x"],
        ["upcycle", "ckpt", "--out", "o"],
        ["moefy", "ckpt", "--data", "d.txt"],
        ["prune", "ckpt", "--remove", "1", "--data", "d.txt", "--out", "o"],
    ],
    ids=["generate", "upcycle", "moefy", "prune"],
)
def test_seed_outside_the_valid_range_is_refused(capsys, argv: list[str], seed: str) -> None:
    one_line_error(capsys, [*argv, "--seed", seed], f"--seed={seed} is invalid", "[0, 2**63 - 1")


@pytest.mark.parametrize("command", ["config", "calc"])
def test_model_prefixed_key_explains_the_real_constraint(capsys, command: str) -> None:
    """`--set model.d_model=65` said "unknown key" while listing d_model: model-level commands read
    keys relative to the model config, where `model.` was taken as a field named `model`."""
    argv = ["config", "--preset", "tiny"] if command == "config" else ["calc", "tiny"]
    err = one_line_error(capsys, [*argv, "--set", "model.d_model=65"], "model.d_model=65 is invalid",
                         "divisible by model.n_heads=4")
    assert "unknown key" not in err
    assert main([*argv, "--set", "model.d_model=64", "--set", "model.moe.top_k=1"]) == 0


# ----------------------------------------------------------------------------- calc on folders


def _checkpoint(folder: Path, model_cfg) -> None:
    from moelab.checkpoint.state import save_checkpoint
    from moelab.data.tokenizer import BytesTokenizer
    from moelab.model.transformer import Transformer

    run = RunConfig(model=model_cfg, data=DataConfig(seq_len=32, tokenizer="bytes"), train=TrainConfig(steps=1))
    save_checkpoint(folder, Transformer(model_cfg), run, BytesTokenizer())


def test_calc_accepts_run_checkpoint_and_model_folders(capsys, tmp_path) -> None:
    from moelab.checkpoint.folder import checkpoint_name
    from moelab.convert.hf import save_moelab
    from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
    from moelab.model.transformer import Transformer

    cfg = tiny_config(moe=tiny_moe())
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints" / checkpoint_name(3), cfg)
    want = count(arch_from_config(cfg)).total
    for target in (run, run / "checkpoints" / checkpoint_name(3)):
        assert main(["calc", str(target), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["params"]["total"] == want
    assert main(["calc", str(run), "--set", "moe.num_experts=8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"]["num_experts"] == 8
    save_moelab(Transformer(cfg), tmp_path / "folder")
    assert main(["calc", str(tmp_path / "folder"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["total"] == want
    save_moelab(EncoderDecoder(EncoderDecoderConfig.from_model(cfg)), tmp_path / "t5")
    one_line_error(capsys, ["calc", str(tmp_path / "t5")], "encoder–decoder")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["calc", str(tmp_path / "empty")], "holds no complete checkpoint")


def test_config_out_never_replaces_a_file_unasked(tmp_path, capsys) -> None:
    target = tmp_path / "mine.yaml"
    target.write_text("notes the user wrote\n")
    assert main(["config", "--preset", "smoke", "--out", str(target)]) == 2
    assert "--overwrite" in capsys.readouterr().err and target.read_text() == "notes the user wrote\n"
    assert main(["config", "--preset", "smoke", "--out", str(target), "--overwrite"]) == 0
    assert "d_model" in target.read_text()
    assert main(["config", "--preset", "smoke", "--out", str(tmp_path), "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err

"""``--dtype`` reaches the loader of every command that loads a model for inference or scoring (issue 26)."""

from __future__ import annotations

import math

import pytest
import torch

from moelab import cli
from moelab.checkpoint.state import save_checkpoint
from moelab.config import DataConfig, RunConfig
from moelab.data.tokenizer import BytesTokenizer
from moelab.errors import UserError
from moelab.experiment.evaluate import evaluate_checkpoint
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_moe


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=259, moe=tiny_moe())).eval()
    data = DataConfig(corpus="synthetic", tokenizer="bytes", seq_len=32, synthetic_docs=8, max_bytes_per_domain=4000)
    return save_checkpoint(tmp_path / "ckpt", model, RunConfig(model=model.cfg, data=data), BytesTokenizer())


def test_eval_scores_the_weights_in_the_dtype_asked_for(ckpt) -> None:
    fp32 = evaluate_checkpoint(ckpt, batches=2)
    bf16 = evaluate_checkpoint(ckpt, batches=2, dtype="bf16")
    assert fp32["tokens"] == bf16["tokens"] > 0
    assert bf16["loss"] != fp32["loss"] and math.isclose(bf16["loss"], fp32["loss"], rel_tol=0.02)


@pytest.mark.parametrize("command", ["analyze", "serve", "generate", "eval"])
def test_the_flag_reaches_the_loader(command, ckpt, tmp_path, monkeypatch, capsys) -> None:
    """Each command hands ``--dtype`` to ``load_model`` (stopped there: the rest is tested elsewhere)."""
    import moelab.convert.load as checkpoint

    seen = []

    def spy(path, device="cpu", dtype=None, on_module_loaded=None):
        seen.append(dtype)
        raise UserError("stop here")

    monkeypatch.setattr(checkpoint, "load_model", spy)
    monkeypatch.setattr("moelab.experiment.evaluate.load_model", spy)
    argv = {
        "analyze": ["analyze", str(ckpt), "--data", "synthetic", "--out", str(tmp_path / "a")],
        "serve": ["serve", str(ckpt)],
        "generate": ["generate", str(ckpt), "--prompt", "hi"],
        "eval": ["eval", str(ckpt)],
    }[command]
    if command == "serve":
        pytest.importorskip("fastapi")
    assert cli.main([*argv, "--dtype", "fp16"]) == 2
    assert "stop here" in capsys.readouterr().err and seen == ["fp16"]


def test_eval_tasks_pass_the_dtype_to_the_harness_model(ckpt, capsys, monkeypatch) -> None:
    import moelab.experiment.harness as harness
    from moelab.errors import UserError

    seen = []

    def spy(path, tasks, **kwargs):
        seen.append(kwargs["dtype"])
        raise UserError("stop here")

    monkeypatch.setattr(harness, "evaluate_tasks", spy)
    assert cli.main(["eval", str(ckpt), "--tasks", "x", "--dtype", "bf16"]) == 2
    assert "stop here" in capsys.readouterr().err and seen == ["bf16"]


def test_disk_offload_refuses_a_dtype_the_file_does_not_hold(ckpt, capsys) -> None:
    argv = ["generate", str(ckpt), "--prompt", "hi", "--offload", "--dtype", "bf16"]
    assert cli.main(argv) == 2
    assert "add --offload-from memory" in capsys.readouterr().err
    assert cli.main([*argv, "--offload-from", "memory", "--max-tokens", "2"]) == 0

"""`moelab train --init` refuses weights holding NaN or infinity, as every checkpoint load does (issue 25)."""

from __future__ import annotations

import pytest
import torch

from moelab.cli import main
from moelab.convert.hf import save_moelab
from moelab.data.tokenizer import BytesTokenizer
from moelab.model.transformer import Transformer

from helpers import tiny_config

FAST = ["--preset", "smoke", "--set", "data.corpus=synthetic", "--set", "data.synthetic_docs=6", "--no-progress",
        "--set", "train.steps=2", "--set", "train.eval_batches=1", "--set", "train.batch_size=2"]  # fmt: skip


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_model_folder_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path, capsys, bad) -> None:
    model = Transformer(tiny_config(vocab_size=259))
    with torch.no_grad():
        model.blocks[1].attn.o_proj.weight[0, 0] = bad
    src = save_moelab(model, tmp_path / "diverged")
    BytesTokenizer().save(src)
    assert main(["train", "--init", str(src), *FAST, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("moelab train: error: --init") and "'blocks.1.attn.o_proj.weight'" in err
    assert "1 of" in err and "NaN or infinite" in err and "earlier checkpoint" in err
    assert not (tmp_path / "run").exists()  # refused before the run folder is touched

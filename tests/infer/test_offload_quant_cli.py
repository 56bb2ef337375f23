"""`moelab quantize` then `moelab generate --offload` end to end, through a real checkpoint on disk."""

from __future__ import annotations

import json

import pytest
import torch

from moelab import cli
from moelab.checkpoint.state import save_checkpoint
from moelab.config import DataConfig, RunConfig
from moelab.data.tokenizer import BytesTokenizer
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_moe


@pytest.mark.parametrize("bits", [8, 4])
def test_generate_offload_on_quantize_output(tmp_path, capsys, bits: int) -> None:
    tok = BytesTokenizer()
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_layers=2, d_model=64, vocab_size=tok.vocab_size,
                                    moe=tiny_moe(num_experts=4, top_k=2, expert_hidden=64))).eval()
    save_checkpoint(tmp_path / "ck", model, RunConfig(model=model.cfg, data=DataConfig(seq_len=model.cfg.max_seq_len)), tok)
    out = tmp_path / f"int{bits}"
    assert cli.main(["quantize", str(tmp_path / "ck"), "--bits", str(bits), "--group", "32", "--only", "experts",
                     "--out", str(out)]) == 0
    argv = ["generate", str(out), "--prompt", "hello", "--prompt", "MoE", "--max-tokens", "8", "--ignore-eos", "--json"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["completions"]
    for extra in (["--offload-from", "disk", "--expert-cache", "1"], ["--offload-from", "memory", "--prefetch"]):
        assert cli.main([*argv, "--offload", *extra]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["completions"] == plain
        s = data["offload"]
        assert s["misses"] > 0 and s["bytes_moved"] > 0 and s["bytes_moved"] % s["misses"] == 0

"""quantize_model scopes, the checkpoint round trip (bitwise), and `moelab quantize`."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from moelab.checkpoint.state import save_checkpoint
from moelab.cli import main
from moelab.config import ConfigError, DataConfig, RunConfig
from moelab.convert.load import load_model
from moelab.data.tokenizer import BytesTokenizer
from moelab.errors import UserError
from moelab.model.transformer import Transformer
from moelab.quant import QuantExperts, QuantLinear, quantization_record, quantize_model

from helpers import tiny_config, tiny_moe

SRC = Path(__file__).resolve().parents[2] / "src"


def _model(**kw) -> Transformer:
    return Transformer(tiny_config(vocab_size=259, moe=tiny_moe(), **kw)).eval()


def _run(model: Transformer) -> RunConfig:
    return RunConfig(model=model.cfg, data=DataConfig(seq_len=32))


def _count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def test_experts_only_leaves_every_linear_but_routers_alone():
    model = quantize_model(_model(), bits=8, only="experts")
    assert _count(model, QuantExperts) == 2
    assert _count(model, QuantLinear) == 2 * 2 * 4  # up and down of 4 experts in 2 layers
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.blocks[0].attn.q_proj, nn.Linear)


def test_all_quantizes_attention_and_head_but_not_routers_or_embedding():
    model = _model()
    ids = torch.randint(0, 259, (2, 9))
    before = model(ids).logits
    quantize_model(model, bits=4, group_size=32, only="all")
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.blocks[1].attn.o_proj, QuantLinear)
    assert isinstance(model.embed, nn.Embedding)
    assert not any(isinstance(m, QuantLinear) for n, m in model.named_modules() if "router" in n)
    after = model(ids).logits
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert 0 < (after - before).norm() / before.norm() < 0.3


def test_dense_model_needs_only_all():
    dense = Transformer(tiny_config(vocab_size=259)).eval()
    with pytest.raises(UserError, match="no experts"):
        quantize_model(dense, bits=8, only="experts")
    quantize_model(dense, bits=8, only="all")
    assert isinstance(dense.blocks[0].ffn.w_up, QuantLinear)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"quant\.only"):
        quantize_model(_model(), bits=8, only="attention")
    with pytest.raises(ConfigError, match=r"quant\.bits"):
        quantize_model(_model(), bits=2)


@pytest.mark.parametrize("bits,group,only", [(8, 32, "experts"), (4, 32, "all"), (4, 128, "experts")])
def test_save_load_round_trip_is_bitwise(tmp_path, bits, group, only):
    model = _model()
    quantize_model(model, bits=bits, group_size=group, only=only)
    ids = torch.randint(0, 259, (2, 11))
    with torch.no_grad():
        expected = model(ids).logits  # first call packs int4 weights into the kernel layout
    path = save_checkpoint(tmp_path / "q", model, _run(model), BytesTokenizer())
    meta = json.loads((path / "state.json").read_text())
    assert meta["quantization"]["bits"] == bits and meta["quantization"]["only"] == only
    loaded, _ = load_model(path)
    assert quantization_record(loaded) == quantization_record(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
        assert torch.equal(loaded(ids[:1, :1]).logits, model(ids[:1, :1]).logits)  # T=1
    saved = {k: v for k, v in loaded.state_dict().items()}
    for k, v in model.state_dict().items():
        assert torch.equal(saved[k], v), k


def test_cli_quantize_writes_a_loadable_smaller_checkpoint(tmp_path, capsys):
    model = _model()
    src = save_checkpoint(tmp_path / "fp", model, _run(model), BytesTokenizer())
    assert main(["quantize", str(src), "--bits", "4", "--group", "32", "--only", "all", "--out", str(tmp_path / "q4")]) == 0
    assert "int4" in capsys.readouterr().out
    q, _ = load_model(tmp_path / "q4")
    assert isinstance(q.lm_head, QuantLinear) and q.lm_head.bits == 4
    assert (tmp_path / "q4" / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size
    ids = torch.randint(0, 259, (1, 5))
    expected = quantize_model(_model_from(src), bits=4, group_size=32, only="all")(ids).logits
    with torch.no_grad():
        assert torch.equal(q(ids).logits, expected)
    # a quantized checkpoint is refused as a source; bad bits fail in argparse
    assert main(["quantize", str(tmp_path / "q4"), "--bits", "8", "--out", str(tmp_path / "qq")]) == 2
    assert "already quantized" in capsys.readouterr().err


def _model_from(path: Path) -> Transformer:
    model, _ = load_model(path)
    return model


def test_cli_subprocess_group_error_is_one_line(tmp_path):
    model = _model()
    src = save_checkpoint(tmp_path / "fp", model, _run(model), BytesTokenizer())
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "moelab", "quantize", str(src), "--bits", "4", "--group", "48", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "quant.group_size=48" in proc.stderr


def test_dequantize_model_gives_the_quantized_outputs():
    from moelab.quant import dequantize_model

    model = quantize_model(_model(), bits=4, group_size=32, only="all")
    ids = torch.randint(0, 259, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        dq = dequantize_model(model)
        assert not any(isinstance(m, (QuantLinear, QuantExperts)) for m in dq.modules())
        torch.testing.assert_close(dq(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_prepack_packs_every_weight_without_changing_outputs():
    from moelab.quant import kernels, prepack

    model = quantize_model(_model(), bits=4, group_size=64, only="all")
    model2 = copy.deepcopy(model)
    ids = torch.randint(0, 259, (1, 6))
    int4 = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert int4 and all(m.layout is None for m in int4)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits  # packs lazily
    prepack(model2)
    cpu_kernel = kernels.kernel_for(4, "cpu").name
    assert all(m.layout == cpu_kernel for m in model2.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        assert torch.equal(model2(ids).logits, before)
    assert all(torch.equal(v, plain[k]) for k, v in model2.state_dict().items())

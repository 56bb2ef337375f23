"""`moelab quantize` streams (issue 26): each module is quantized as soon as its weights are in, the result
is bitwise the in-memory quantization, and converted model folders are accepted as sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelab.checkpoint.state import save_checkpoint
from moelab.cli import main
from moelab.config import DataConfig, RunConfig
from moelab.convert.hf import save_moelab
from moelab.convert.load import load_model
from moelab.data.tokenizer import BytesTokenizer
from moelab.experiment.quantize import QuantizeWhileLoading, quantize_checkpoint
from moelab.model.transformer import Transformer
from moelab.moe.experts import Experts
from moelab.quant import quantization_record, quantize_model
from moelab.quant.linear import QuantLinear

from helpers import tiny_config, tiny_moe


def _model(tie: bool = False) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=259, n_layers=3, moe=tiny_moe(), tie_embeddings=tie)).eval()


def _checkpoint(tmp_path: Path, tie: bool = False) -> Path:
    model = _model(tie)
    run = RunConfig(model=model.cfg, data=DataConfig(seq_len=32))
    return save_checkpoint(tmp_path / "fp", model, run, BytesTokenizer())


@pytest.mark.parametrize("bits,group,only,tie", [(8, 32, "experts", False), (4, 32, "all", True), (4, 64, "all", False)])
def test_streamed_quantize_equals_quantizing_the_loaded_model(tmp_path, bits, group, only, tie) -> None:
    src = _checkpoint(tmp_path, tie)
    quantize_checkpoint(src, tmp_path / "q", bits, group, only)
    expected = quantize_model(load_model(src)[0], bits, group, only)
    got, _ = load_model(tmp_path / "q")
    assert quantization_record(got) == quantization_record(expected)
    a, b = got.state_dict(), expected.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if tie and only == "all":  # a tied head becomes its own quantized matrix; the embedding stays float
        assert isinstance(got.lm_head, QuantLinear) and got.embed.weight.dtype == torch.float32


def test_quantize_holds_one_float_expert_module_at_a_time(tmp_path, monkeypatch) -> None:
    src = _checkpoint(tmp_path)
    alive: list[int] = []
    real = QuantizeWhileLoading.__call__

    def spy(self, model, path, module):
        alive.append(sum(isinstance(m, Experts) and not m.w_up.is_meta for m in model.modules()))
        real(self, model, path, module)

    monkeypatch.setattr(QuantizeWhileLoading, "__call__", spy)
    quantize_checkpoint(src, tmp_path / "q", 8)
    assert max(alive) == 1  # three MoE layers, never two float expert stacks at once
    q, _ = load_model(tmp_path / "q")
    assert not any(isinstance(m, Experts) for m in q.modules())


def test_quantize_accepts_a_model_folder_and_a_dtype(tmp_path, capsys) -> None:
    model = _model()
    save_moelab(model, tmp_path / "ml")  # what `moelab convert` writes: no completion marker, no state
    BytesTokenizer().save(tmp_path / "ml")
    assert main(["quantize", str(tmp_path / "ml"), "--bits", "8", "--out", str(tmp_path / "q"), "--dtype", "bf16"]) == 0
    assert "quantized 3 modules" in capsys.readouterr().out
    q, tok = load_model(tmp_path / "q")
    assert tok.vocab_size == 259 and q.cfg == model.cfg
    assert q.embed.weight.dtype == torch.bfloat16  # float parts in the dtype asked for
    assert {m.scales.dtype for m in q.modules() if isinstance(m, QuantLinear)} == {torch.bfloat16}
    expected = quantize_model(_model().to(torch.bfloat16), 8)
    for name, mod in expected.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(q.get_submodule(name).plain_qweight(), mod.plain_qweight()), name
    assert main(["generate", str(tmp_path / "q"), "--prompt", "hi", "--max-tokens", "3", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.startswith("hi")


def test_a_dense_model_with_only_experts_is_refused_early(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    save_moelab(Transformer(tiny_config(vocab_size=259)), tmp_path / "ml")
    BytesTokenizer().save(tmp_path / "ml")
    assert main(["quantize", str(tmp_path / "ml"), "--out", str(tmp_path / "q")]) == 2
    assert "nothing to quantize with only='experts'" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()

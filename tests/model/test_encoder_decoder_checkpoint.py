"""Encoder–decoder models load back from training checkpoints and moelab folders."""

from __future__ import annotations

import torch

from moelab.checkpoint.state import save_checkpoint
from moelab.config import ModelConfig, MoEConfig, RouterConfig
from moelab.convert.hf import load_moelab, save_moelab
from moelab.convert.load import load_model
from moelab.data.tokenizer import BytesTokenizer
from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig


def _model() -> EncoderDecoder:
    torch.manual_seed(0)
    moe = MoEConfig(
        num_experts=3,
        top_k=1,
        expert_hidden=12,
        router=RouterConfig(name="switch"),
        capacity_scope="sequence",
        expert_capacity=3,
        placement="every_n",
        every_n=2,
    )
    base = ModelConfig(
        vocab_size=256, d_model=16, n_layers=2, n_heads=2, ffn_hidden=20, activation="relu", moe=moe
    )
    return EncoderDecoder(
        EncoderDecoderConfig.from_model(base, decoder_layers=3, position="t5_relative")
    ).eval()


def _logits(model: EncoderDecoder) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(
            torch.randint(0, 256, (2, 9), generator=g), torch.randint(0, 256, (2, 5), generator=g)
        ).logits


def test_load_model_rebuilds_an_encoder_decoder(tmp_path) -> None:
    model = _model()
    save_checkpoint(tmp_path / "ckpt", model, model.cfg, BytesTokenizer())
    loaded, tok = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, EncoderDecoder) and loaded.cfg == model.cfg and not loaded.training
    assert torch.equal(_logits(loaded), _logits(model))
    assert tok.vocab_size == BytesTokenizer().vocab_size


def test_moelab_folder_round_trip(tmp_path) -> None:
    model = _model()
    save_moelab(model, tmp_path / "m")
    assert "encoder_decoder:" in (tmp_path / "m" / "config.yaml").read_text()
    again = load_moelab(tmp_path / "m")
    assert again.cfg == model.cfg and torch.equal(_logits(again), _logits(model))

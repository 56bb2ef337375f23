"""Encoder–decoder: causal decoder, bidirectional encoder, padding, caches, MoE per stack, twins."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moelab.config import ConfigError
from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from moelab.model.twins import count_params
from moelab.moe.layer import MoELayer

from helpers import tiny_config, tiny_moe

V = 97


def _model(moe=None, seed: int = 0, **kw) -> EncoderDecoder:
    torch.manual_seed(seed)
    return EncoderDecoder(EncoderDecoderConfig.from_model(tiny_config(moe=moe, **kw))).eval()


def _logits(model, enc, dec, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(enc, dec, **kw).logits


STACKS = [None, tiny_moe()]


@pytest.mark.parametrize("moe", STACKS)
def test_decoder_is_causal_and_encoder_is_seen_everywhere(moe) -> None:
    model = _model(moe)
    enc, dec = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 8))
    base = _logits(model, enc, dec)
    changed = dec.clone()
    changed[:, 5] = (changed[:, 5] + 1) % V
    after = _logits(model, enc, changed)
    assert torch.allclose(base[:, :5], after[:, :5], atol=1e-6)
    assert not torch.allclose(base[:, 5:], after[:, 5:], atol=1e-4)
    # Any encoder token (even the last) reaches every decoder position, the first included.
    enc2 = enc.clone()
    enc2[:, -1] = (enc2[:, -1] + 1) % V
    other = _logits(model, enc2, dec)
    for t in range(dec.shape[1]):
        assert not torch.allclose(base[:, t], other[:, t], atol=1e-6)


@pytest.mark.parametrize("moe", STACKS)
def test_cross_attention_respects_encoder_padding(moe) -> None:
    model = _model(moe)
    enc = torch.randint(0, V, (2, 10))
    dec = torch.randint(0, V, (2, 6))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0  # row 1 has 6 real tokens
    padded = _logits(model, enc, dec, attention_mask=mask)
    # Row 1 equals the same row run alone without its padding.
    alone = _logits(model, enc[1:, :6], dec[1:])
    assert torch.allclose(padded[1], alone[0], atol=1e-5)
    # Changing padded tokens changes nothing.
    junk = enc.clone()
    junk[1, 6:] = (junk[1, 6:] + 7) % V
    assert torch.allclose(_logits(model, junk, dec, attention_mask=mask), padded, atol=1e-6)
    # Without the mask the padding is attended to (the test above can fail).
    assert not torch.allclose(_logits(model, enc, dec)[1], alone[0], atol=1e-4)


@pytest.mark.parametrize("moe", STACKS)
def test_cached_decoding_equals_full_forward(moe) -> None:
    model = _model(moe)
    enc = torch.randint(0, V, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, 7:] = 0
    dec = torch.randint(0, V, (3, 9))
    full = _logits(model, enc, dec, attention_mask=mask)
    from moelab.model.encoder_decoder import EncoderDecoderCache

    with torch.no_grad():
        encoded = model.encode(enc, mask)
        cache = EncoderDecoderCache(len(model.decoder_blocks))
        steps = [model.decode(dec[:, :3], encoded, cache=cache)[0]]  # a multi-token first chunk
        steps += [model.decode(dec[:, t : t + 1], encoded, cache=cache)[0] for t in range(3, 9)]
    assert cache.length == 9
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_generate_runs_encoder_and_cross_projection_once_and_matches_naive_greedy() -> None:
    model = _model(tiny_moe())
    enc = torch.randint(0, V, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    calls = {"encoder": 0, "cross_kv": 0}
    model.encoder_blocks[0].register_forward_hook(
        lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1)
    )
    for blk in model.decoder_blocks:
        blk.cross_attn.k_proj.register_forward_hook(
            lambda *a: calls.__setitem__("cross_kv", calls["cross_kv"] + 1)
        )
    out = model.generate(enc, max_new_tokens=7, start_id=0, attention_mask=mask)
    assert out.shape == (2, 7)
    assert calls == {"encoder": 1, "cross_kv": len(model.decoder_blocks)}
    # Naive greedy: the full forward pass recomputed at every step.
    cur = torch.zeros(2, 1, dtype=torch.long)
    for _ in range(7):
        nxt = _logits(model, enc, cur, attention_mask=mask)[:, -1].argmax(-1)
        cur = torch.cat([cur, nxt[:, None]], dim=1)
    assert torch.equal(out, cur[:, 1:])


def test_generate_stops_at_eos() -> None:
    model = _model()
    enc = torch.randint(0, V, (2, 5))
    first = model.generate(enc, max_new_tokens=1, start_id=0)[:, 0]
    out = model.generate(enc, max_new_tokens=6, start_id=0, eos_id=int(first[0]))
    assert (out[0] == first[0]).all()  # row 0 ends at once and then repeats EOS


def test_shared_embedding_is_one_table() -> None:
    model = _model()
    assert model.lm_head.weight is model.embed.weight
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert len(embeddings) == 1
    # The encoder's input embedding gets gradient through the decoder's loss.
    model.train()
    enc = torch.tensor([[5, 6, 7]])
    dec = torch.tensor([[1, 2]])
    model(enc, dec, labels=torch.tensor([[3, 4]])).loss.backward()
    assert model.embed.weight.grad[5].abs().sum() > 0  # token 5 appears only in the encoder


def test_moe_per_stack_and_layer_with_global_layer_ids() -> None:
    enc_cfg = tiny_config(attention="bidirectional", n_layers=3, moe=tiny_moe(placement="every_n", every_n=2))
    dec_cfg = tiny_config(n_layers=2, moe=tiny_moe(num_experts=3, top_k=1, aux_loss_coef=0.1))
    model = EncoderDecoder(EncoderDecoderConfig(encoder=enc_cfg, decoder=dec_cfg)).eval()
    assert [b.is_moe for b in model.blocks] == [False, True, False, True, True]
    assert len(model.moe_layers) == 3 and all(isinstance(m, MoELayer) for m in model.moe_layers)
    out = model(torch.randint(0, V, (2, 7)), torch.randint(0, V, (2, 4)), return_routing=True)
    assert sorted(out.routing) == sorted(out.aux_by_layer) == [1, 3, 4]
    assert [model.layer_name(i) for i in (1, 3, 4)] == ["encoder.1", "decoder.0", "decoder.1"]
    assert out.routing[4].num_experts == 3
    # aux: each loss averaged over the MoE layers of both stacks, weighted by its coefficient.
    lb = torch.stack([out.aux_by_layer[i]["load_balance"] for i in (1, 3, 4)]).mean()
    assert torch.allclose(out.aux["load_balance"], lb)
    # aux_loss: each layer's loss times its own stack's coefficient (0.01 encoder, 0.1 decoder; z_loss 0),
    # averaged over the layers reporting it.
    by_hand = (
        0.01 * out.aux_by_layer[1]["load_balance"]
        + 0.1 * out.aux_by_layer[3]["load_balance"]
        + 0.1 * out.aux_by_layer[4]["load_balance"]
    ) / 3
    assert torch.allclose(out.aux_loss, by_hand)


def test_dense_twin_works_the_same_way() -> None:
    cfg = EncoderDecoderConfig.from_model(tiny_config(moe=tiny_moe()))
    twin = cfg.dense_twin("iso_active")
    assert twin.encoder.moe is None and twin.decoder.moe is None
    moe_model, dense_model = EncoderDecoder(cfg), EncoderDecoder(twin)
    a, d = count_params(moe_model), count_params(dense_model)
    assert d.active == a.active - a.router  # iso-active, as for the decoder-only twin
    enc, dec = torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 5))
    out = dense_model(enc, dec, labels=dec)
    assert out.aux_loss is None and torch.isfinite(out.loss)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"encoder\.attention"):
        EncoderDecoderConfig(encoder=tiny_config(), decoder=tiny_config())
    with pytest.raises(ConfigError, match=r"decoder\.d_model"):
        EncoderDecoderConfig(encoder=tiny_config(attention="bidirectional"), decoder=tiny_config(d_model=64))
    with pytest.raises(ConfigError, match=r"decoder\.attention"):
        EncoderDecoderConfig(
            encoder=tiny_config(attention="bidirectional"), decoder=tiny_config(attention="prefix")
        )
    cfg = EncoderDecoderConfig.from_model(tiny_config(), decoder_layers=3)
    assert (cfg.encoder.n_layers, cfg.decoder.n_layers, cfg.n_layers) == (2, 3, 5)
    assert replace(cfg).decoder.attention == "causal"


def test_config_round_trips_through_yaml(tmp_path) -> None:
    from moelab.config import load_config, save_config

    cfg = EncoderDecoderConfig.from_model(
        tiny_config(moe=tiny_moe()), decoder_layers=3, position="t5_relative"
    )
    save_config(cfg, tmp_path / "model.yaml")
    assert load_config(tmp_path / "model.yaml", EncoderDecoderConfig) == cfg


def test_gradients_reach_every_parameter() -> None:
    model = _model(tiny_moe())
    model.train()
    out = model(torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 5)), labels=torch.randint(0, V, (2, 5)))
    out.total_loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing

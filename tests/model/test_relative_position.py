"""T5 bucketed relative position bias against transformers' T5Attention, and as an encoder–decoder option."""

from __future__ import annotations

import pytest
import torch

from moelab.config import ConfigError
from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderCache, EncoderDecoderConfig
from moelab.model.relative_position import RelativePositionBias, relative_position_bucket

from helpers import tiny_config

T5Attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 20), (10, 33), (6, 7)])
def test_buckets_equal_transformers(bidirectional, num_buckets, max_distance) -> None:
    rel = torch.arange(-300, 301)[None, :] + torch.arange(0, 3)[:, None]
    ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    ref = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, ref)
    assert ours.min() >= 0 and ours.max() < num_buckets


@pytest.mark.parametrize("is_decoder", [False, True])
def test_bias_equals_transformers_compute_bias(is_decoder) -> None:
    from transformers import T5Config

    cfg = T5Config(
        d_model=24,
        d_kv=8,
        num_heads=3,
        relative_attention_num_buckets=10,
        relative_attention_max_distance=17,
        is_decoder=is_decoder,
    )
    ref = T5Attention(cfg, has_relative_attention_bias=True).eval()
    ours = RelativePositionBias(3, not is_decoder, 10, 17)
    ours.bias.weight.data.copy_(ref.relative_attention_bias.weight.data)
    for past, S, L in ((0, 13, 13), (5, 1, 6), (4, 3, 7)):
        expected = ref.compute_bias(S, L, past_seen_tokens=past)
        got = ours(torch.arange(past, past + S), torch.arange(L))
        assert got.shape == (1, 3, S, L) and torch.equal(got, expected)


def _model(**kw) -> EncoderDecoder:
    torch.manual_seed(0)
    model = EncoderDecoder(
        EncoderDecoderConfig.from_model(
            tiny_config(**kw), position="t5_relative", relative_buckets=8, relative_max_distance=12
        )
    )
    with torch.no_grad():  # a visible bias, so position effects are large
        model.encoder_relative.bias.weight.normal_(0, 1.0)
        model.decoder_relative.bias.weight.normal_(0, 1.0)
    return model.eval()


@torch.no_grad()
def test_relative_model_is_causal_respects_padding_and_caches_exactly() -> None:
    model = _model()
    enc, dec = torch.randint(0, 97, (2, 15)), torch.randint(0, 97, (2, 14))
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, 9:] = 0
    full = model(enc, dec, attention_mask=mask).logits
    changed = dec.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 97
    after = model(enc, changed, attention_mask=mask).logits
    assert torch.allclose(full[:, :6], after[:, :6], atol=1e-6) and not torch.allclose(
        full[:, 6:], after[:, 6:]
    )
    assert torch.allclose(full[1], model(enc[1:, :9], dec[1:]).logits[0], atol=1e-5)
    encoded = model.encode(enc, mask)
    cache = EncoderDecoderCache(len(model.decoder_blocks))
    steps = [model.decode(dec[:, :4], encoded, cache=cache)[0]]
    steps += [model.decode(dec[:, t : t + 1], encoded, cache=cache)[0] for t in range(4, 14)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@torch.no_grad()
def test_relative_mode_has_no_rope() -> None:
    """With a zero bias table nothing knows positions: the encoder is permutation-equivariant."""
    model = _model()
    model.encoder_relative.bias.weight.zero_()
    enc, dec = torch.randint(0, 97, (1, 10)), torch.randint(0, 97, (1, 3))
    perm = torch.randperm(10)
    a = model.encode(enc).hidden
    b = model.encode(enc[:, perm]).hidden
    assert torch.allclose(a[:, perm], b, atol=1e-5)
    # ... and the bias is what brings positions back.
    model.encoder_relative.bias.weight.normal_(0, 1.0)
    assert not torch.allclose(model.encode(enc).hidden[:, perm], model.encode(enc[:, perm]).hidden, atol=1e-3)
    assert model(enc, dec).logits.shape == (1, 3, 97)


def test_position_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="position"):
        EncoderDecoderConfig.from_model(tiny_config(), position="alibi")
    with pytest.raises(ConfigError, match="relative_max_distance"):
        EncoderDecoderConfig.from_model(
            tiny_config(), position="t5_relative", relative_buckets=32, relative_max_distance=8
        )
    from helpers import tiny_moe

    cfg = EncoderDecoderConfig.from_model(
        tiny_config(moe=tiny_moe()), position="t5_relative", relative_buckets=8
    )
    twin = cfg.dense_twin()
    assert (twin.position, twin.relative_buckets, twin.decoder.moe) == ("t5_relative", 8, None)


@torch.no_grad()
def test_scale_decoder_output_is_t5s_tied_head_scale() -> None:
    cfg = EncoderDecoderConfig.from_model(tiny_config())
    torch.manual_seed(0)
    plain = EncoderDecoder(cfg).eval()
    from dataclasses import replace

    scaled = EncoderDecoder(replace(cfg, scale_decoder_output=True)).eval()
    scaled.load_state_dict(plain.state_dict())
    enc, dec = torch.randint(0, 97, (2, 5)), torch.randint(0, 97, (2, 4))
    # The head is linear: logits scale by d_model^-0.5 = 32^-0.5.
    assert torch.allclose(scaled(enc, dec).logits, plain(enc, dec).logits * 32**-0.5, atol=1e-6)

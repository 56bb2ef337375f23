"""Masks, RoPE, GQA and the model output contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.model.rope import RotaryEmbedding, apply_rope
from moelab.model.transformer import Attention, Transformer

from helpers import tiny_config, tiny_moe


def _logits(model: Transformer, ids: torch.Tensor, **kw) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("moe", [None, tiny_moe()])
def test_causal_mask_hides_the_future(moe) -> None:
    model = Transformer(tiny_config(moe=moe))
    ids = torch.randint(0, 97, (2, 10))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 97
    a, b = _logits(model, ids), _logits(model, changed)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-4)


def test_bidirectional_mask_sees_everything() -> None:
    model = Transformer(tiny_config(attention="bidirectional"))
    ids = torch.randint(0, 97, (2, 10))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 97
    a, b = _logits(model, ids), _logits(model, changed)
    assert not torch.allclose(a[:, :6], b[:, :6], atol=1e-4)
    for t in range(6):
        assert not torch.allclose(a[:, t], b[:, t], atol=1e-5)


def test_prefix_mask_is_bidirectional_in_prefix_and_causal_after() -> None:
    model = Transformer(tiny_config(attention="prefix"))
    ids = torch.randint(0, 97, (2, 12))
    prefix = torch.tensor([5, 8])
    # A token inside the prefix changes earlier prefix positions.
    in_prefix = ids.clone()
    in_prefix[:, 4] = (in_prefix[:, 4] + 1) % 97
    a, b = _logits(model, ids, prefix_len=prefix), _logits(model, in_prefix, prefix_len=prefix)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-5)
    # A token after the prefix never changes earlier positions.
    after = ids.clone()
    after[:, 9] = (after[:, 9] + 1) % 97
    c = _logits(model, after, prefix_len=prefix)
    assert torch.allclose(a[:, :9], c[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], c[:, 9:], atol=1e-4)
    # Sample 0 has prefix 5: position 6 is causal there, so changing token 7 leaves 0..6 alone.
    later = ids.clone()
    later[0, 7] = (later[0, 7] + 1) % 97
    d = _logits(model, later, prefix_len=prefix)
    assert torch.allclose(a[0, :7], d[0, :7], atol=1e-6)
    # With prefix_len 0 the prefix model is exactly causal.
    causal = Transformer(tiny_config())
    causal.load_state_dict(model.state_dict())
    zero = torch.zeros(2, dtype=torch.long)
    assert torch.allclose(_logits(model, ids, prefix_len=zero), _logits(causal, ids), atol=1e-5)


def test_prefix_attention_without_prefix_len_is_an_error() -> None:
    model = Transformer(tiny_config(attention="prefix"))
    with pytest.raises(ValueError, match="prefix_len"):
        model(torch.randint(0, 97, (1, 4)))


def test_rope_scores_depend_only_on_relative_position() -> None:
    rope = RotaryEmbedding(head_dim=16, theta=10000.0)
    q = torch.randn(1, 1, 1, 16)
    k = torch.randn(1, 1, 1, 16)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    base = score(7, 3)
    for shift in (1, 5, 40, 500):
        assert torch.allclose(score(7 + shift, 3 + shift), base, atol=1e-4)
    assert not torch.allclose(score(8, 3), base, atol=1e-4)


def test_gqa_with_as_many_kv_heads_as_heads_is_mha() -> None:
    cfg = tiny_config(n_heads=4, n_kv_heads=4)
    attn = Attention(cfg).eval()
    x = torch.randn(2, 9, cfg.d_model)
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(torch.arange(9).expand(2, 9))
    got = attn(x, rope, None, True)
    # Plain multi-head attention written out.
    B, S, H, Dh = 2, 9, 4, cfg.head_dim
    q = attn.q_proj(x).view(B, S, H, Dh).transpose(1, 2)
    k = attn.k_proj(x).view(B, S, H, Dh).transpose(1, 2)
    v = attn.v_proj(x).view(B, S, H, Dh).transpose(1, 2)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    scores = q @ k.transpose(-1, -2) / Dh**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), float("-inf"))
    want = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, H * Dh))
    assert torch.allclose(got, want, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    gqa_cfg = tiny_config(n_heads=4, n_kv_heads=2)
    gqa = Attention(gqa_cfg).eval()
    mha = Attention(tiny_config(n_heads=4, n_kv_heads=4)).eval()
    Dh = gqa_cfg.head_dim
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for src, dst in ((gqa.k_proj, mha.k_proj), (gqa.v_proj, mha.v_proj)):
            heads = src.weight.view(2, Dh, -1)
            dst.weight.copy_(heads.repeat_interleave(2, dim=0).reshape(4 * Dh, -1))
    x = torch.randn(1, 6, gqa_cfg.d_model)
    rope = RotaryEmbedding(Dh, 10000.0)(torch.arange(6).expand(1, 6))
    assert torch.allclose(gqa(x, rope, None, True), mha(x, rope, None, True), atol=1e-5)


def test_output_has_loss_aux_and_routing() -> None:
    model = Transformer(tiny_config(moe=tiny_moe(z_loss_coef=0.001)))
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids[:, :-1], labels=ids[:, 1:], return_routing=True)
    assert out.logits.shape == (2, 7, 97)
    assert set(out.routing) == {0, 1}
    assert set(out.aux) == {"load_balance", "z_loss"}
    want_aux = 0.01 * out.aux["load_balance"] + 0.001 * out.aux["z_loss"]
    assert torch.allclose(out.aux_loss, want_aux)
    manual = F.cross_entropy(out.logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-6)
    out.total_loss.backward()
    assert model.blocks[0].ffn.router.gate.weight.grad.abs().sum() > 0


def test_labels_minus_100_are_ignored() -> None:
    model = Transformer(tiny_config())
    ids = torch.randint(0, 97, (1, 8))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[0, 4:], ids[0, 4:])
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_padding_is_not_attended() -> None:
    model = Transformer(tiny_config()).eval()
    ids = torch.randint(0, 97, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 2] = 0
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 5) % 97
    a = _logits(model, ids, attention_mask=mask)
    b = _logits(model, changed, attention_mask=mask)
    keep = [0, 1, 3, 4, 5, 6, 7]
    assert torch.allclose(a[0, keep], b[0, keep], atol=1e-6)
    assert torch.isfinite(a).all()


def test_tied_embeddings_share_storage_and_untied_do_not() -> None:
    tied = Transformer(tiny_config())
    assert tied.lm_head.weight is tied.embed.weight
    untied = Transformer(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed.weight


def test_layernorm_and_gelu_variant_runs() -> None:
    model = Transformer(tiny_config(norm="layernorm", activation="gelu", moe=tiny_moe()))
    out = model(torch.randint(0, 97, (2, 5)), labels=torch.randint(0, 97, (2, 5)))
    assert torch.isfinite(out.total_loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_frequencies_stay_fp32_through_a_dtype_cast(dtype: torch.dtype) -> None:
    """``model.to(bf16)`` casts every floating buffer; RoPE's frequencies rounded to 8 bits would turn
    position 1000's cos by up to 0.43. They come back fp32 and equal to a fresh model's."""
    fresh = RotaryEmbedding(64, 10000.0)
    cast = RotaryEmbedding(64, 10000.0).to(dtype)
    assert cast.inv_freq.dtype == torch.float32 and torch.equal(cast.inv_freq, fresh.inv_freq)
    pos = torch.tensor([[0, 1, 1000, 4000]])
    assert all(torch.equal(a, b) for a, b in zip(cast(pos), fresh(pos)))
    model = Transformer(tiny_config()).to(dtype)
    assert model.rope.inv_freq.dtype == torch.float32

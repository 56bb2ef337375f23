"""GGUF export for llama.cpp: names, layouts, RoPE order and quantized blocks, against the model itself
and, where llama-cpp-python is installed, against llama.cpp's own forward pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.helpers import tiny_config, tiny_mla, tiny_moe

from moelab.errors import ConfigError, UserError
from moelab.model.rope import apply_rope
from moelab.model.transformer import Transformer

gguf = pytest.importorskip("gguf", reason='GGUF export needs the gguf package (pip install -e ".[peer]")')

from moelab.convert.gguf import export_gguf, read_gguf_tensor, rotate_pairs_layout  # noqa: E402


def _model(moe: bool, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = tiny_config(moe=tiny_moe(expert_hidden=32) if moe else None, ffn_hidden=64, **kw)
    return Transformer(cfg).eval()


def _reader(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def _field(reader, key):
    f = reader.fields[key]
    return f.parts[f.data[0]].tolist()[0] if len(f.data) == 1 else [f.parts[i].tolist()[0] for i in f.data]


@pytest.mark.parametrize("moe", [False, True])
def test_f32_export_holds_every_weight_under_llama_cpp_names(moe, tmp_path):
    model = _model(moe, tie_embeddings=False)
    path = export_gguf(model, tmp_path / "m.gguf", "f32")
    reader, tensors = _reader(path)
    cfg = model.cfg
    f = reader.fields["general.architecture"]
    assert bytes(f.parts[f.data[0]]).decode() == "llama"
    assert _field(reader, "llama.block_count") == cfg.n_layers
    assert _field(reader, "llama.attention.head_count_kv") == cfg.n_kv_heads
    per_block = 6 + (4 if moe else 3)  # 2 norms, q k v o, then router + 3 expert stacks or gate/up/down
    assert len(tensors) == 1 + cfg.n_layers * per_block + 2
    if moe:
        assert _field(reader, "llama.expert_count") == 4 and _field(reader, "llama.expert_used_count") == 2
        gate, up = model.blocks[1].ffn.experts.w_up.detach().chunk(2, dim=1)
        np.testing.assert_array_equal(read_gguf_tensor(path, "blk.1.ffn_gate_exps.weight"), gate.numpy())
        np.testing.assert_array_equal(read_gguf_tensor(path, "blk.1.ffn_up_exps.weight"), up.numpy())
        np.testing.assert_array_equal(
            read_gguf_tensor(path, "blk.1.ffn_down_exps.weight"), model.blocks[1].ffn.experts.w_down.detach().numpy()
        )
        assert tuple(int(d) for d in tensors["blk.1.ffn_gate_exps.weight"].shape) == (32, 32, 4)  # ggml: D, F, E
    v = model.blocks[0].attn.v_proj.weight.detach().numpy()
    np.testing.assert_array_equal(read_gguf_tensor(path, "blk.0.attn_v.weight"), v)
    q = read_gguf_tensor(path, "blk.0.attn_q.weight")
    assert not np.array_equal(q, model.blocks[0].attn.q_proj.weight.detach().numpy())  # reordered for llama.cpp's RoPE
    np.testing.assert_array_equal(read_gguf_tensor(path, "output.weight"), model.lm_head.weight.detach().numpy())


def _rope_adjacent_pairs(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's 'normal' RoPE written out: pair (x[2j], x[2j+1]) turned by pos · θ^(-2j/h)."""
    h = x.shape[-1]
    freq = theta ** (-torch.arange(0, h, 2, dtype=torch.float64) / h)  # [h/2]
    ang = pos[:, None].double() * freq  # [S, h/2]
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty_like(x, dtype=torch.float64)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_reordered_queries_and_keys_give_the_same_attention_scores_under_adjacent_pair_rope():
    """moelab rotates a head's halves; the exported rows, rotated by adjacent pairs, give every q·k unchanged."""
    torch.manual_seed(1)
    heads, h, d, S = 2, 8, 12, 5
    wq, wk = torch.randn(heads * h, d, dtype=torch.float64), torch.randn(heads * h, d, dtype=torch.float64)
    x = torch.randn(S, d, dtype=torch.float64)
    pos = torch.arange(S)
    freq = 10000.0 ** (-torch.arange(0, h, 2, dtype=torch.float64) / h)
    ang = torch.cat([pos[:, None] * freq] * 2, dim=-1)  # moelab's halves layout of the angles
    cos, sin = ang.cos(), ang.sin()

    def ours(w):  # [heads, S, h] through moelab's apply_rope
        return apply_rope((x @ w.T).reshape(S, heads, h).transpose(0, 1)[None], cos, sin)[0]

    def theirs(w):
        return _rope_adjacent_pairs((x @ rotate_pairs_layout(w, heads).T).reshape(S, heads, h).transpose(0, 1), pos, 1e4)

    scores = ours(wq) @ ours(wk).transpose(-1, -2)  # apply_rope rotates in fp32
    torch.testing.assert_close(scores, theirs(wq) @ theirs(wk).transpose(-1, -2), atol=1e-4, rtol=1e-5)


# Worst error per block of 32, as a share of its largest magnitude: q8_0 half a step of max/127 (plus the f16
# scale's rounding); q4_0 a step of max/8 (values of the other sign clip at 7 steps).
@pytest.mark.parametrize("weights,bound", [("q8_0", 0.6 / 127), ("q4_0", 1.01 / 8)])
def test_quantized_export_keeps_norms_routers_and_embedding_in_floating_point(weights, bound, tmp_path):
    model = _model(True)
    path = export_gguf(model, tmp_path / "m.gguf", weights)
    _, tensors = _reader(path)
    kinds = {name: t.tensor_type.name for name, t in tensors.items()}
    assert kinds["token_embd.weight"] == "BF16" and kinds["blk.0.ffn_gate_inp.weight"] == "F32"
    assert kinds["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in kinds  # tied head: token_embd reused
    assert kinds["blk.0.attn_v.weight"] == kinds["blk.0.ffn_down_exps.weight"] == weights.upper()
    w = model.blocks[0].ffn.experts.w_down.detach()
    got = torch.from_numpy(read_gguf_tensor(path, "blk.0.ffn_down_exps.weight"))
    blocks = w.reshape(-1, 32).abs().amax(-1, keepdim=True)  # one scale per 32 inputs
    assert ((got - w).reshape(-1, 32).abs() <= blocks * bound).all()


def test_unsupported_models_and_existing_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="Mixtral-style"):
        export_gguf(Transformer(tiny_config(moe=tiny_moe(expert_hidden=32), mla=tiny_mla())), tmp_path / "a.gguf")
    with pytest.raises(ConfigError, match="needs 'all'"):  # the Mixtral family's own check
        cfg = tiny_config(moe=tiny_moe(expert_hidden=32, placement="explicit", layers=(1,)), ffn_hidden=64)
        export_gguf(Transformer(cfg), tmp_path / "b.gguf")
    with pytest.raises(UserError, match="multiple of 32"):
        export_gguf(Transformer(tiny_config(moe=tiny_moe())), tmp_path / "c.gguf", "q8_0")
    (tmp_path / "d.gguf").write_text("mine")
    with pytest.raises(UserError, match="exists"):
        export_gguf(_model(False), tmp_path / "d.gguf")
    assert (tmp_path / "d.gguf").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gguf"]  # nothing half-written left behind


@pytest.mark.parametrize("moe", [False, True])
def test_llama_cpp_runs_the_export_as_moelab_does(moe, tmp_path):
    """llama.cpp's logits on the f32 export equal moelab's forward, position by position."""
    pytest.importorskip("llama_cpp", reason='llama.cpp peer not installed (pip install -e ".[peer]")')
    from moelab.infer.llama_cpp_peer import LlamaCppModel

    model = _model(moe, seed=3, vocab_size=300, init_std=0.1)  # attention far from uniform: RoPE order shows
    path = export_gguf(model, tmp_path / "m.gguf", "f32")
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits[0]
    peer = LlamaCppModel(path, batch=1, positions=16, threads=1, kv_f32=True)
    try:
        got = [peer.decode([ids[0, :3].tolist()], 0)[0]]
        got += [peer.decode([[int(ids[0, t])]], t)[0] for t in range(3, 7)]
    finally:
        peer.close()
    scale = want.abs().max().item()
    for j, logits in enumerate(got):  # f32 in both engines; ≤ 4e-4 of the scale seen (a wrong RoPE order: > 0.08)
        torch.testing.assert_close(torch.from_numpy(logits), want[2 + j], atol=1e-3 * scale, rtol=0)
    assert math.isfinite(float(want.sum()))

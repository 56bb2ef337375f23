"""Offloading weight-only quantized experts: the tiers move int8/int4 payloads, and generation is
exactly that of the same quantized model kept in memory."""

from __future__ import annotations

import pytest
import torch

from moelab.checkpoint.state import save_checkpoint
from moelab.config import DataConfig, RunConfig
from moelab.convert.load import load_model
from moelab.data.tokenizer import BytesTokenizer
from moelab.experiment.quantize import quantize_checkpoint
from moelab.infer.expert_store import expert_payloads, payload_bytes
from moelab.infer.generate import SamplingParams, generate
from moelab.infer.offload import Offloader
from moelab.model.transformer import Transformer
from moelab.moe.dispatch import DISPATCHERS
from moelab.quant.model import quantize_model

from helpers import tiny_config, tiny_moe

PARAMS = [SamplingParams(max_new_tokens=10, stop_at_eos=False)]
PROMPTS = [[3, 14, 15, 92, 65, 35], [27, 18, 28]]


def _base() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(n_layers=3, d_model=64, moe=tiny_moe(num_experts=8, top_k=2, expert_hidden=64))).eval()


def _quantized(bits: int) -> Transformer:
    model = quantize_model(_base(), bits=bits, group_size=32, only="experts")
    for block in model.blocks:  # the offloader runs the loop dispatch: compare with the same order of sums
        if block.is_moe:
            block.ffn.dispatch = DISPATCHERS["loop"]
    return model


@pytest.fixture(scope="module", params=[8, 4])
def quantized(request) -> tuple[int, list[list[int]], torch.Tensor]:
    """(bits, in-memory greedy tokens, full-forward logits) of the quantized model."""
    model = _quantized(request.param)
    tokens = [c.token_ids for c in generate(model, [PROMPTS[0]] * 1 + [PROMPTS[1]], PARAMS * 2)]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]])).logits
    return request.param, tokens, logits


@pytest.mark.parametrize(("policy", "prefetch", "capacity"), [("lru", False, 1), ("lru", True, "25%"), ("pinned", False, 2)])
def test_offloaded_quantized_generation_is_identical(quantized, policy, prefetch, capacity) -> None:
    bits, want_tokens, want_logits = quantized
    model = _quantized(bits)
    counts = {i: [float(8 - e) for e in range(8)] for i in range(3)} if policy == "pinned" else None
    off = Offloader(model, capacity, policy, prefetch=prefetch, counts=counts)
    assert all(type(b.ffn.experts).__name__ == "OffloadedExperts" for b in model.blocks)
    got = [c.token_ids for c in generate(model, [PROMPTS[0], PROMPTS[1]], PARAMS * 2)]
    assert got == want_tokens
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([PROMPTS[0]])).logits, want_logits)
    s = off.stats
    assert s.misses > 0 and s.bytes_moved == s.misses * off.caches[0].expert_bytes


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_payload_bytes_shrink_the_moves(bits: int) -> None:
    fp32 = expert_payloads(_base().blocks[0].ffn.experts)[0]
    q = _quantized(bits).blocks[0].ffn.experts
    payload = expert_payloads(q)[0]
    assert payload_bytes(payload) == sum(t.numel() * t.element_size() for t in payload)
    assert payload_bytes(payload) == sum(
        b.numel() * b.element_size() for m in (q.up[0], q.down[0]) for b in m.buffers() if b is not None
    )
    ratio = payload_bytes(payload) / payload_bytes(fp32)
    assert ratio < (0.3 if bits == 8 else 0.2)  # int8 ≈ ¼ (+ scales), int4 ≈ ⅛ (+ scales and zeros)
    off = Offloader(_quantized(bits), 1, "lru")
    assert off.caches[0].expert_bytes == payload_bytes(payload)


@pytest.mark.parametrize("bits", [8, 4])
def test_disk_tier_reads_a_quantized_checkpoint(tmp_path, bits: int) -> None:
    """`moelab quantize` output, experts memory-mapped from its model.safetensors (int4: plain
    nibbles packed after each fetch): the same tokens as the loaded quantized model in memory."""
    src, out = tmp_path / "ckpt", tmp_path / f"int{bits}"
    base = _base()
    run = RunConfig(model=base.cfg, data=DataConfig(seq_len=base.cfg.max_seq_len))
    save_checkpoint(src, base, run, BytesTokenizer())
    quantize_checkpoint(src, out, bits=bits, group_size=32, only="experts")
    ref_model, _ = load_model(out)
    want = [c.token_ids for c in generate(ref_model, PROMPTS, PARAMS * 2)]
    model, _ = load_model(out)
    off = Offloader(model, 2, "lru", prefetch=True, source=out / "model.safetensors")
    assert [c.token_ids for c in generate(model, PROMPTS, PARAMS * 2)] == want
    assert off.stats.misses > 0

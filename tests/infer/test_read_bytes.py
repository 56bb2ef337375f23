"""Bytes a decode step reads per token, checked against the model's parameter count written out by hand."""

from __future__ import annotations

import pytest
import torch

from moelab.infer.read_bytes import expected_distinct, step_bytes
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_moe


@pytest.mark.parametrize("tied", [False, True])
def test_fp32_moe_step_reads_dense_weights_k_of_e_experts_one_embedding_row_and_the_kv_cache(tied: bool) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(d_model=64, tie_embeddings=tied, moe=tiny_moe(num_experts=4, top_k=2, expert_hidden=32))
    model = Transformer(cfg).eval()
    experts = [b.ffn.experts for b in model.blocks if b.is_moe]
    expert_bytes = sum(4 * (e.w_up.numel() + e.w_down.numel()) for e in experts)
    embed = model.embed.weight
    everything = 4 * sum(p.numel() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    assert (model.lm_head.weight is embed) == tied  # parameters() counts a tied weight once
    one = step_bytes(model, batch=1, context=10, kv_bytes_per_position=100.0)
    assert one.experts == pytest.approx(expert_bytes * 2 / 4)
    # the head is read whole; an untied embedding one row a token (a tied one is the head's read)
    rows = 0 if tied else 4 * embed.numel() - 4 * embed.shape[1]
    assert one.dense == pytest.approx(everything - expert_bytes - rows)
    assert one.kv == 1000.0 and one.per_token == one.dense + one.experts + one.kv
    eight = step_bytes(model, batch=8, context=10, kv_bytes_per_position=100.0)
    assert eight.experts == pytest.approx(expert_bytes / 4 * expected_distinct(4, 2, 8))  # ≈ all 4 experts
    assert eight.per_token < one.per_token  # the batch shares the weights it reads


def test_expected_distinct_experts() -> None:
    assert expected_distinct(8, 2, 1) == pytest.approx(2.0)
    assert expected_distinct(8, 8, 3) == pytest.approx(8.0)
    assert expected_distinct(64, 8, 8) == pytest.approx(64 * (1 - (56 / 64) ** 8))

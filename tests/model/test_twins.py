"""Dense twins and parameter counts."""

from __future__ import annotations

import pytest

from moelab.config import ConfigError
from moelab.model.transformer import Transformer
from moelab.model.twins import count_params, dense_twin

from helpers import tiny_config, tiny_moe


def test_count_params_matches_a_hand_count() -> None:
    V, D, L, H, G, Dh, F, E, K, Fe = 97, 32, 2, 4, 2, 8, 48, 4, 2, 24
    attn = D * H * Dh + 2 * D * G * Dh + H * Dh * D
    norms = 2 * D
    dense_layer = attn + norms + 3 * D * F
    moe_total = attn + norms + E * 3 * D * Fe + D * E
    moe_active = attn + norms + K * 3 * D * Fe + D * E

    dense = count_params(Transformer(tiny_config()))
    assert dense.embedding == V * D
    assert dense.total == dense.active == L * dense_layer + D  # + final norm
    assert dense.router == 0

    moe = count_params(Transformer(tiny_config(moe=tiny_moe())))
    assert moe.total == L * moe_total + D
    assert moe.active == L * moe_active + D
    assert moe.router == L * D * E

    untied = count_params(Transformer(tiny_config(tie_embeddings=False)))
    assert untied.total == dense.total + V * D


@pytest.mark.parametrize("shared", [0, 1])
def test_iso_active_twin_has_the_moe_active_parameters(shared: int) -> None:
    cfg = tiny_config(moe=tiny_moe(num_shared_experts=shared, shared_hidden=16))
    moe = count_params(Transformer(cfg))
    twin_cfg = dense_twin(cfg, "iso_active")
    assert twin_cfg.moe is None and twin_cfg.ffn_hidden == 2 * 24 + shared * 16
    twin = count_params(Transformer(twin_cfg))
    assert twin.active == moe.active - moe.router
    assert twin.embedding == moe.embedding


def test_iso_total_twin_has_the_moe_total_parameters() -> None:
    cfg = tiny_config(moe=tiny_moe())
    moe = count_params(Transformer(cfg))
    twin = count_params(Transformer(dense_twin(cfg, "iso_total")))
    assert twin.total == moe.total - moe.router


def test_iso_flop_twin_adds_the_router_flops() -> None:
    cfg = tiny_config(moe=tiny_moe(num_experts=6))
    assert dense_twin(cfg, "iso_flop").ffn_hidden == 2 * 24 + 2


def test_twin_of_partial_moe_keeps_dense_layers() -> None:
    cfg = tiny_config(n_layers=3, moe=tiny_moe(placement="first_k_dense", first_k_dense=1))
    twin = dense_twin(cfg, "iso_active")
    assert twin.layer_ffn_hidden == () and twin.ffn_hidden == 48  # 2 * 24 == ffn_hidden: one size
    cfg = tiny_config(n_layers=3, moe=tiny_moe(placement="first_k_dense", first_k_dense=1, top_k=1))
    twin = dense_twin(cfg, "iso_active")
    assert twin.layer_ffn_hidden == (48, 24, 24)
    assert [b.ffn.hidden for b in Transformer(twin).blocks] == [48, 24, 24]


def test_twin_needs_moe_and_a_known_kind() -> None:
    with pytest.raises(ConfigError, match=r"model\.moe is null"):
        dense_twin(tiny_config())
    with pytest.raises(ConfigError, match="iso_active"):
        dense_twin(tiny_config(moe=tiny_moe()), "iso_lol")

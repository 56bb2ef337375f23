"""Expert choice written out from Zhou et al. 2022: G, I = TopK(softmax(X·W_g)ᵀ, C), y_t = Σ_{e picks t} G·FFN_e(x_t)."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.moe.layer import MoELayer
from router_cases import router_case

pytestmark = pytest.mark.filterwarnings("ignore::moelab.moe.routers.expert_choice.NonCausalRouterWarning")

D = 16


def test_layer_output_equals_the_papers_expert_choice_mixture() -> None:
    cfg = router_case("expert_choice", capacity_factor=1.5, drop_policy="position")
    layer = MoELayer(D, cfg, "swiglu")
    B, S = 2, 10
    x = torch.randn(B, S, D)
    out = layer(x)
    x_TD = x.reshape(-1, D)
    T, E = B * S, cfg.num_experts
    C = math.ceil(T * 1.5 / E)  # n·c/e
    S_TE = (x_TD @ layer.router.gate.weight.T).softmax(-1)
    G_EC, I_EC = S_TE.t().topk(C, dim=-1)
    want = torch.zeros(T, D)
    for e in range(E):
        for j in range(C):
            t = int(I_EC[e, j])
            want[t] += G_EC[e, j] * layer.experts.forward_expert(e, x_TD[t : t + 1])[0]
    assert torch.allclose(out.y.reshape(-1, D), want, atol=1e-6)
    d = out.decision
    assert d.capacity == C and d.kept.all()  # the layer's capacity policy is not applied on top
    per_token = torch.bincount(d.token, minlength=T)
    assert per_token.sum() == E * C  # tokens get 0..E experts, E·C assignments in all


def test_capacity_defaults_to_top_k_experts_per_token_and_decoding_one_token_uses_every_expert() -> None:
    layer = MoELayer(D, router_case("expert_choice", capacity_factor=None, top_k=2), "swiglu")
    d = layer(torch.randn(1, 16, D)).decision
    assert d.capacity == math.ceil(16 * 2 / 8) == 4
    single = layer(torch.randn(1, 1, D)).decision  # why it is not causal-safe: T=1 → every expert picks it
    assert single.capacity == 1 and single.token.tolist() == [0] * 8


def test_padding_is_picked_only_when_real_tokens_run_out_and_never_kept() -> None:
    layer = MoELayer(D, router_case("expert_choice", capacity_factor=4.0), "swiglu")  # C = 4·8/8 = 4 of 8 tokens
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]])
    d = layer(torch.randn(1, 8, D), token_mask_BS=mask).decision
    real = d.token < 3
    assert d.kept.equal(real)
    for e in range(8):
        assert set(d.token[(d.expert == e) & d.kept].tolist()) == {0, 1, 2}  # all 3 real tokens before any padding

"""Routers against transformers' implementations on the same weights and inputs (tiny configs built in code)."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, SwitchTransformersConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersTop1Router,
    load_balancing_loss_func,
    router_z_loss_func,
)

from moelab.moe.losses import load_balance_loss, sequence_balance_loss, z_loss
from moelab.moe.routers import build_router
from router_cases import router_case

D = 16


def _sorted_pairs(expert_TK: torch.Tensor, weight_TK: torch.Tensor):
    order = expert_TK.argsort(dim=-1)
    return expert_TK.gather(1, order), weight_TK.gather(1, order)


@pytest.mark.parametrize(
    ("n_group", "topk_group", "k", "renorm"),
    [(1, 1, 2, True), (4, 2, 2, True), (4, 1, 2, True), (2, 1, 3, False), (4, 3, 4, True)],
)
def test_sigmoid_bias_equals_transformers_deepseek_v3_gate(n_group: int, topk_group: int, k: int, renorm: bool) -> None:
    E, T = 8, 40
    hf_cfg = DeepseekV3Config(
        hidden_size=D,
        n_routed_experts=E,
        num_experts_per_tok=k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
        norm_topk_prob=renorm,
    )
    theirs = DeepseekV3TopkRouter(hf_cfg)
    cfg = router_case(
        "sigmoid_bias",
        top_k=k,
        router={"n_group": n_group, "topk_group": topk_group, "routed_scaling_factor": 2.5, "renormalize": renorm},
    )
    ours = build_router(D, cfg)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(E, D))
        ours.gate.weight.copy_(theirs.weight)
        bias = torch.randn(E) * 0.3  # a non-zero balancing bias changes the selection, not the weights
        theirs.e_score_correction_bias.copy_(bias)
        ours.bias.copy_(bias)
    x = torch.randn(T, D)
    logits, w_theirs, e_theirs = theirs(x)
    d = ours(x, (1, T))
    assert torch.allclose(d.logits, logits, atol=1e-6)
    e_ours, w_ours = _sorted_pairs(d.expert.view(T, k), d.weight.view(T, k))
    e_ref, w_ref = _sorted_pairs(e_theirs, w_theirs)
    assert torch.equal(e_ours, e_ref)
    assert torch.allclose(w_ours, w_ref, atol=1e-6)
    if n_group > 1 and topk_group < n_group:  # group limiting really excluded experts somewhere
        plain = build_router(D, router_case("sigmoid_bias", top_k=k, router={"n_group": 1, "topk_group": 1}))
        plain.load_state_dict(ours.state_dict())
        assert not torch.equal(plain(x, (1, T)).expert, d.expert)


def _switch_pair(jitter: float):
    E = 8
    hf_cfg = SwitchTransformersConfig(
        d_model=D, num_experts=E, expert_capacity=10_000, router_jitter_noise=jitter, router_bias=False
    )
    theirs = SwitchTransformersTop1Router(hf_cfg)
    ours = build_router(D, router_case("switch", router={"jitter_eps": jitter}))
    with torch.no_grad():
        theirs.classifier.weight.copy_(torch.randn(E, D))
        ours.gate.weight.copy_(theirs.classifier.weight)
    return theirs, ours


@pytest.mark.parametrize("training", [False, True])
def test_switch_equals_transformers_switch_router(training: bool) -> None:
    theirs, ours = _switch_pair(jitter=0.2)
    theirs.train(training)
    ours.train(training)
    B, S = 3, 11
    x = torch.randn(B, S, D)
    torch.manual_seed(5)  # the same jitter draw: both take uniform_ over B·S·D values in the same order
    one_hot, probs, logits = theirs(x.clone())
    torch.manual_seed(5)
    d = ours(x.reshape(-1, D), (B, S))
    assert torch.allclose(d.logits, logits.reshape(-1, 8), atol=1e-5)
    assert torch.equal(d.expert, one_hot.reshape(-1, 8).argmax(-1))
    assert torch.allclose(d.weight, probs.reshape(-1), atol=1e-6)
    # Their losses on their tensors equal ours on our decision.
    assert torch.allclose(z_loss(d), router_z_loss_func(logits), atol=1e-5)
    # Their balance loss averages E·Σ f_i·P_i per group (sequence): our seq_aux with K=1; over the
    # whole batch as one group it is our load_balance.
    probs_all = logits.softmax(-1)
    per_group = load_balancing_loss_func(probs_all, one_hot.argmax(-1))
    assert torch.allclose(sequence_balance_loss(d), per_group, atol=1e-5)
    one_group = load_balancing_loss_func(probs_all.reshape(1, B * S, 8), one_hot.argmax(-1).reshape(1, B * S))
    assert torch.allclose(load_balance_loss(d), one_group, atol=1e-5)

"""MoELayer against closed forms: one expert is a dense MLP, k=E is the full mixture."""

from __future__ import annotations

import pytest
import torch

from moelab.config import RouterConfig
from moelab.moe.layer import MoELayer
from moelab.nn.ffn import DenseMLP

from helpers import tiny_moe


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_one_expert_top1_renormalised_equals_dense_mlp(activation: str) -> None:
    layer = MoELayer(16, tiny_moe(num_experts=1, top_k=1, expert_hidden=24), activation)
    dense = DenseMLP(16, 24, activation)
    with torch.no_grad():
        layer.experts.w_up[0].copy_(dense.w_up.weight)
        layer.experts.w_down[0].copy_(dense.w_down.weight)
    x = torch.randn(3, 5, 16)
    assert torch.allclose(layer(x).y, dense(x), atol=1e-6)


def test_topk_with_k_equal_E_is_the_probability_weighted_sum_of_all_experts() -> None:
    layer = MoELayer(16, tiny_moe(num_experts=4, top_k=4), "swiglu")
    x = torch.randn(2, 7, 16)
    out = layer(x).y
    x_TD = x.reshape(-1, 16)
    probs_TE = (x_TD @ layer.router.gate.weight.T).softmax(-1)
    want = sum(probs_TE[:, e : e + 1] * layer.experts.forward_expert(e, x_TD) for e in range(4))
    assert torch.allclose(out.reshape(-1, 16), want, atol=1e-6)


def test_topk_written_out_for_k2_without_renormalisation() -> None:
    layer = MoELayer(16, tiny_moe(router=RouterConfig(renormalize=False)), "swiglu")
    x_TD = torch.randn(9, 16)
    out = layer(x_TD.unsqueeze(0)).y[0]
    probs = (x_TD @ layer.router.gate.weight.T).softmax(-1)
    for t in range(9):
        top = probs[t].topk(2)
        want = sum(top.values[j] * layer.experts.forward_expert(int(top.indices[j]), x_TD[t : t + 1])[0] for j in range(2))
        assert torch.allclose(out[t], want, atol=1e-6)


def test_softmax_after_topk_equals_renormalised() -> None:
    a = MoELayer(16, tiny_moe(), "swiglu")
    b = MoELayer(16, tiny_moe(router=RouterConfig(softmax_after_topk=True)), "swiglu")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 16)
    assert torch.allclose(a(x).y, b(x).y, atol=1e-6)


def test_shared_experts_are_added_to_every_token() -> None:
    layer = MoELayer(16, tiny_moe(num_shared_experts=2, shared_hidden=8), "swiglu")
    assert layer.shared is not None and layer.shared.hidden == 16
    x = torch.randn(1, 4, 16)
    routed = layer.dispatch(x.reshape(-1, 16), layer.route(x.reshape(-1, 16), (1, 4), None, None), layer.experts)
    assert torch.allclose(layer(x).y.reshape(-1, 16), routed + layer.shared(x.reshape(-1, 16)), atol=1e-6)


def test_router_math_is_fp32_under_bf16_autocast() -> None:
    layer = MoELayer(16, tiny_moe(), "swiglu")
    x = torch.randn(1, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.decision.logits.dtype == torch.float32
    assert out.decision.scores.dtype == torch.float32


def test_force_balanced_router_gives_uniform_load() -> None:
    layer = MoELayer(16, tiny_moe(router=RouterConfig(force_balanced=True)), "swiglu")
    out = layer(torch.randn(2, 8, 16))
    counts = out.decision.tokens_per_expert()
    assert counts.tolist() == [8, 8, 8, 8]
    per_token = out.decision.expert.view(16, 2)
    assert (per_token[:, 0] != per_token[:, 1]).all()


def test_decision_fields_are_consistent() -> None:
    layer = MoELayer(16, tiny_moe(), "swiglu")
    d = layer(torch.randn(3, 5, 16)).decision
    assert d.num_tokens == 15 and d.num_assignments == 30
    assert d.batch_shape == (3, 5)
    assert d.tokens_per_expert().sum() == 30
    assert (d.weight >= 0).all()
    assert torch.allclose(d.weight.view(15, 2).sum(-1), torch.ones(15))
    assert d.rank.view(15, 2).tolist() == [[0, 1]] * 15
    assert d.position.view(3, 5, 2)[1, :, 0].tolist() == [0, 1, 2, 3, 4]

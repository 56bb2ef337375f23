"""Balance and z-losses against the formulas and transformers' implementations."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

from moelab.moe.decision import token_choice_decision
from moelab.moe.losses import load_balance_loss, z_loss


def decision_from_logits(logits_TE: torch.Tensor, k: int, mask_T: torch.Tensor | None = None):
    scores = logits_TE.softmax(-1)
    w, e = scores.topk(k, dim=-1)
    return token_choice_decision(e, w, logits_TE, scores, (1, logits_TE.shape[0]), mask_T)


@pytest.mark.parametrize(("E", "k"), [(4, 1), (8, 2), (6, 3)])
def test_load_balance_equals_transformers_mixtral(E: int, k: int) -> None:
    logits = torch.randn(37, E)
    ours = load_balance_loss(decision_from_logits(logits, k))
    theirs = load_balancing_loss_func((logits,), num_experts=E, top_k=k)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_load_balance_equals_transformers_with_padding_mask() -> None:
    logits = torch.randn(2 * 9, 8)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    ours = load_balance_loss(decision_from_logits(logits, 2, mask.reshape(-1).bool()))
    theirs = load_balancing_loss_func((logits,), num_experts=8, top_k=2, attention_mask=mask)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_load_balance_written_out_is_k_at_balance_and_E_at_collapse() -> None:
    E, k, T = 8, 2, 64
    # The formula: E * sum_i f_i * P_i with f_i = (assignments to i) / T, P_i = mean prob of i.
    balanced = torch.zeros(T, E)  # uniform probabilities; ties broken into a round robin below
    expert = (torch.arange(T * k) % E).view(T, k)
    d = token_choice_decision(expert, torch.full((T, k), 0.5), balanced, balanced.softmax(-1), (1, T))
    f = torch.bincount(expert.reshape(-1), minlength=E).float() / T
    P = balanced.softmax(-1).mean(0)
    assert torch.allclose(load_balance_loss(d), E * (f * P).sum())
    assert torch.allclose(load_balance_loss(d), torch.tensor(float(k)))
    collapsed = torch.full((T, E), -30.0)
    collapsed[:, :k] = 30.0
    d = decision_from_logits(collapsed, k)
    assert torch.allclose(load_balance_loss(d), torch.tensor(float(E)), atol=1e-4)


def test_padding_changes_no_loss() -> None:
    logits = torch.randn(10, 4)
    mask = torch.tensor([True] * 7 + [False] * 3)
    base = decision_from_logits(logits, 2, mask)
    garbage = logits.clone()
    garbage[7:] = torch.randn(3, 4) * 50
    changed = decision_from_logits(garbage, 2, mask)
    assert torch.allclose(load_balance_loss(base), load_balance_loss(changed))
    assert torch.allclose(z_loss(base), z_loss(changed))
    assert torch.allclose(z_loss(base), decision_from_logits(logits[:7], 2).logits.logsumexp(-1).square().mean())


def test_z_loss_equals_formula_and_transformers_switch() -> None:
    logits = torch.randn(3, 11, 6) * 3
    d = decision_from_logits(logits.reshape(-1, 6), 1)
    assert torch.allclose(z_loss(d), torch.logsumexp(logits, -1).square().mean(), atol=1e-5)
    assert torch.allclose(z_loss(d), router_z_loss_func(logits), atol=1e-5)


def test_balance_loss_gradient_reaches_router_probabilities_only() -> None:
    logits = torch.randn(12, 4, requires_grad=True)
    load_balance_loss(decision_from_logits(logits, 2)).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0

"""Router losses written out from their papers' equations, padding-invariance, and the layer's loss report."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.model.transformer import Transformer
from moelab.moe.decision import token_choice_decision
from moelab.moe.losses import (
    BALANCE_LOSSES,
    importance_loss,
    load_loss,
    router_loss,
    sequence_balance_loss,
)
from moelab.moe.routers import build_router
from router_cases import ROUTER_NAMES, router_case

from helpers import tiny_config

D = 16


def _cv2(values: list[float]) -> float:
    """Shazeer et al.: CV² = variance / mean², population variance."""
    n = len(values)
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / n) / (mean**2 + 1e-10)


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_topk_losses_equal_the_paper_equations(k: int) -> None:
    cfg = router_case("noisy_topk", top_k=k, router={"noise_std": 1.0})
    router = build_router(D, cfg).train()
    with torch.no_grad():
        router.noise.weight.normal_(0, 0.5)
    T, E = 12, cfg.num_experts
    x = torch.randn(T, D)
    torch.manual_seed(3)
    d = router(x, (1, T))
    # Recompute H(x) = x·W_g + ε·softplus(x·W_noise) with the same ε draw, by hand.
    torch.manual_seed(3)
    clean = (x @ router.gate.weight.T).tolist()
    raw_noise = (x @ router.noise.weight.T).tolist()
    eps = torch.randn(T, E).tolist()
    softplus = [[math.log1p(math.exp(v)) for v in row] for row in raw_noise]
    H = [[clean[t][i] + eps[t][i] * softplus[t][i] for i in range(E)] for t in range(T)]
    # G(x) = softmax(KeepTopK(H, k)); Importance_i = Σ_x G(x)_i  (eq. 3-6)
    importance = [0.0] * E
    for t in range(T):
        top = sorted(range(E), key=lambda i: -H[t][i])[:k]
        z = sum(math.exp(H[t][i]) for i in top)
        for i in top:
            importance[i] += math.exp(H[t][i]) / z
        assert sorted(d.expert.view(T, k)[t].tolist()) == sorted(top)
    assert math.isclose(float(importance_loss(d).detach()), _cv2(importance), rel_tol=1e-4, abs_tol=1e-7)
    # P(x, i) = Φ(((x·W_g)_i − kth_excluding(H(x), k, i)) / softplus((x·W_noise)_i)); Load_i = Σ_x P(x, i)  (eq. 8-10)
    load = [0.0] * E
    for t in range(T):
        for i in range(E):
            others = sorted((H[t][j] for j in range(E) if j != i), reverse=True)
            load[i] += _phi((clean[t][i] - others[k - 1]) / softplus[t][i])
    assert math.isclose(float(load_loss(d).detach()), _cv2(load), rel_tol=1e-4, abs_tol=1e-7)


def test_noisy_topk_load_loss_has_gradient_for_both_weight_matrices() -> None:
    router = build_router(D, router_case("noisy_topk")).train()
    d = router(torch.randn(20, D), (2, 10))
    load_loss(d).backward()
    assert router.gate.weight.grad.abs().sum() > 0 and router.noise.weight.grad.abs().sum() > 0


def test_sequence_balance_loss_equals_deepseek_v3_equations() -> None:
    B, S, E, K = 3, 7, 6, 2
    scores = torch.rand(B * S, E)  # sigmoid-like scores, not normalised
    expert = torch.stack([torch.randperm(E)[:K] for _ in range(B * S)])
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :] = False  # an all-padding sequence takes no part in the mean
    d = token_choice_decision(expert, torch.rand(B * S, K), scores.logit(), scores, (B, S), mask.reshape(-1))
    per_seq = []
    for b in range(B):
        ts = [b * S + s for s in range(S) if mask[b, s]]
        if not ts:
            continue
        total = 0.0
        for i in range(E):
            # f_i = E/(K·T) Σ_t 1(s_i,t ∈ TopK);  P_i = 1/T Σ_t s'_i,t,  s' = s / Σ_j s_j  (eq. 18-20)
            f = E / (K * len(ts)) * sum(1 for t in ts if i in expert[t].tolist())
            p = sum(float(scores[t, i] / scores[t].sum()) for t in ts) / len(ts)
            total += f * p
        per_seq.append(total)
    assert math.isclose(float(sequence_balance_loss(d)), sum(per_seq) / len(per_seq), rel_tol=1e-5)


def test_sequence_balance_loss_is_one_at_balance() -> None:
    E, K, S = 4, 2, 8
    expert = (torch.arange(S * K) % E).view(S, K)
    scores = torch.full((S, E), 0.3)
    d = token_choice_decision(expert, torch.ones(S, K), scores, scores, (1, S))
    assert math.isclose(float(sequence_balance_loss(d)), 1.0, rel_tol=1e-6)


def _loss_names() -> list[str]:
    return [*BALANCE_LOSSES, "z_loss"]


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_padded_tokens_change_no_loss(name: str) -> None:
    """Garbage in padded positions changes no loss of any router (a known bug elsewhere)."""
    router = build_router(D, router_case(name)).eval()
    B, S = 2, 9
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, 8:] = False
    x = torch.randn(B * S, D)
    ids = torch.randint(0, 50, (B * S,))
    garbage_x, garbage_ids = x.clone(), ids.clone()
    pad = ~mask.reshape(-1)
    garbage_x[pad] = torch.randn(int(pad.sum()), D) * 30
    garbage_ids[pad] = 3
    a = router(x, (B, S), token_ids_T=ids, token_mask_T=mask.reshape(-1))
    b = router(garbage_x, (B, S), token_ids_T=garbage_ids, token_mask_T=mask.reshape(-1))
    checked = 0
    for loss in _loss_names():
        if loss == "load" and name != "noisy_topk":
            continue
        la, lb = router_loss(loss)(a), router_loss(loss)(b)
        assert torch.allclose(la, lb, atol=1e-6), (name, loss)
        checked += 1
    assert checked >= 5
    # ... while the same garbage without a mask does change the balance loss.
    c = router(garbage_x, (B, S), token_ids_T=garbage_ids)
    if name not in ("hash", "expert_choice"):
        assert not torch.allclose(router_loss("load_balance")(a), router_loss("load_balance")(c))


def test_model_reports_every_configured_loss_by_name_with_its_coefficient() -> None:
    moe = router_case("noisy_topk", aux_loss="load_balance", aux_loss_coef=0.01, z_loss_coef=0.001,
                      importance_coef=0.1, load_coef=0.2, seq_aux_coef=0.3)
    model = Transformer(tiny_config(moe=moe))
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    names = {"load_balance", "z_loss", "importance", "load", "seq_aux"}
    assert set(out.aux) == names and all(set(v) == names for v in out.aux_by_layer.values())
    coefs = moe.loss_coefs()
    assert coefs == {"load_balance": 0.01, "z_loss": 0.001, "importance": 0.1, "load": 0.2, "seq_aux": 0.3}
    want = sum(coefs[n] * torch.stack([v[n] for v in out.aux_by_layer.values()]).mean() for n in names)
    assert torch.allclose(out.aux_loss, want)
    out.total_loss.backward()
    assert model.blocks[0].ffn.router.noise.weight.grad.abs().sum() > 0

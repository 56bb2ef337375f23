"""Contract tests over every registered router: the invariants the rest of moelab relies on."""

from __future__ import annotations

import pytest
import torch

from moelab.moe.routers import ROUTERS, build_router
from router_cases import ROUTER_NAMES, router_case

D, B, S = 16, 3, 10


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(B * S, D, generator=g)
    ids_T = torch.randint(0, 50, (B * S,), generator=g)
    return x_TD, ids_T


def _route(router, x_TD, ids_T, mask_T=None):
    return router(x_TD, (B, S), token_ids_T=ids_T, token_mask_T=mask_T)


def test_every_router_has_a_case_and_a_paper() -> None:
    assert set(ROUTER_NAMES) >= {"topk", "switch", "noisy_topk", "expert_choice", "sigmoid_bias", "hash"}
    for name, cls in ROUTERS.items():
        assert cls.paper and cls.formula and cls.__doc__, name


@pytest.mark.parametrize("name", ROUTER_NAMES)
@pytest.mark.parametrize("training", [True, False])
def test_decision_invariants(name: str, training: bool) -> None:
    cfg = router_case(name)
    router = build_router(D, cfg).train(training)
    x_TD, ids_T = _inputs()
    d = _route(router, x_TD, ids_T)
    T, E, K = B * S, cfg.num_experts, cfg.top_k
    assert d.num_tokens == T and d.num_experts == E and d.batch_shape == (B, S)
    assert d.logits.shape == (T, E) and d.scores.shape == (T, E)
    assert d.logits.dtype == torch.float32 and d.scores.dtype == torch.float32
    assert d.token.shape == d.expert.shape == d.weight.shape == d.rank.shape == d.kept.shape
    assert (d.weight >= 0).all()
    assert d.expert.min() >= 0 and d.expert.max() < E and d.token.min() >= 0 and d.token.max() < T
    assert int(d.tokens_per_expert(kept_only=False).sum()) == d.num_assignments
    if ROUTERS[name].manages_capacity:  # expert choice: every expert takes exactly C tokens, C = ceil(T·c/E)
        C = -(-T * 2 // E)
        assert d.capacity == C
        assert d.tokens_per_expert().tolist() == [C] * E
        for e in range(E):
            tokens = d.token[d.expert == e]
            assert tokens.unique().numel() == C  # C distinct tokens
            picked = d.scores[tokens, e]
            others = torch.ones(T, dtype=torch.bool)
            others[tokens] = False
            assert picked.min() >= d.scores[others, e].max()  # ... and the C best ones
            assert d.rank[d.expert == e].tolist() == list(range(C))
    else:  # token choice: K distinct experts per token, token-major
        assert d.num_assignments == T * K
        expert_TK = d.expert.view(T, K)
        assert all(len(set(row)) == K for row in expert_TK.tolist())
        assert d.token.view(T, K).tolist() == [[t] * K for t in range(T)]
        assert d.rank.view(T, K).tolist() == [list(range(K))] * T


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_eval_mode_has_no_noise_and_same_seed_gives_same_decision(name: str) -> None:
    router = build_router(D, router_case(name))
    x_TD, ids_T = _inputs()
    router.eval()
    a = _route(router, x_TD, ids_T)
    torch.manual_seed(123)  # a different RNG state must not matter in eval
    b = _route(router, x_TD, ids_T)
    assert torch.equal(a.expert, b.expert) and torch.equal(a.weight, b.weight) and torch.equal(a.logits, b.logits)
    router.train()
    torch.manual_seed(7)
    c = _route(router, x_TD, ids_T)
    torch.manual_seed(7)
    d = _route(router, x_TD, ids_T)
    assert torch.equal(c.expert, d.expert) and torch.equal(c.weight, d.weight) and torch.equal(c.scores, d.scores)


@pytest.mark.parametrize("name", ["switch", "noisy_topk", "topk"])
def test_training_noise_is_really_applied(name: str) -> None:
    """The noisy routers differ between two training calls (else 'eval has no noise' proves nothing)."""
    over = {"router": {"jitter_eps": 0.5}} if name == "topk" else {}
    router = build_router(D, router_case(name, **over)).train()
    x_TD, ids_T = _inputs()
    a, b = _route(router, x_TD, ids_T), _route(router, x_TD, ids_T)
    assert not torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_gradients_reach_learned_router_weights(name: str) -> None:
    router = build_router(D, router_case(name)).train()
    x_TD, ids_T = _inputs()
    d = _route(router, x_TD, ids_T)
    params = list(router.parameters())
    if not ROUTERS[name].learned:
        assert params == [] and not d.weight.requires_grad
        return
    (d.weight * torch.randn_like(d.weight)).sum().backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_force_balanced_or_ignored(name: str) -> None:
    """force_balanced gives round-robin loads on token-choice routers (expert choice is balanced anyway)."""
    router = build_router(D, router_case(name, router={"force_balanced": True})).eval()
    x_TD, ids_T = _inputs()
    d = _route(router, x_TD, ids_T)
    counts = d.tokens_per_expert()
    if name == "hash":  # fixed by token ids: force_balanced does not apply
        assert counts.sum() == d.num_assignments
    else:
        assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_router_math_is_fp32_with_bf16_inputs(name: str) -> None:
    router = build_router(D, router_case(name))
    x_TD, ids_T = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = _route(router, x_TD.bfloat16(), ids_T)
    assert d.logits.dtype == torch.float32 and d.scores.dtype == torch.float32

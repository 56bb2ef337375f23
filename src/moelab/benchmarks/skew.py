"""Skewed load: a biased router, and what time and drops do as balance worsens.

The router is a softmax top-k over ``x·W_gᵀ + s·b`` where ``b`` falls linearly from +1 (expert
0) to −1 (expert E−1): ``s = 0`` is a random, nearly balanced router; larger ``s`` piles tokens
onto the first experts. For each ``s`` the bench reports the max/mean expert load, the drop
rate under capacity factor 1.25 (position policy) and the forward+backward time of each
backend, dropless and with capacity, relative to the balanced case.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.benchmarks.layer import LayerShape, autocast_for
from moelab.benchmarks.timing import interleaved
from moelab.moe.capacity import apply_capacity
from moelab.moe.decision import RoutingDecision, token_choice_decision
from moelab.moe.dispatch import DISPATCHERS
from moelab.moe.experts import Experts

CAPACITY_FACTOR = 1.25


def biased_decision(x_TD: Tensor, gate_ED: Tensor, skew: float, top_k: int) -> RoutingDecision:
    """Top-k softmax routing (renormalised) with a linear bias of strength ``skew`` on the logits."""
    E = gate_ED.shape[0]
    bias_E = skew * torch.linspace(1.0, -1.0, E, device=x_TD.device)
    logits_TE = x_TD.float() @ gate_ED.float().t() + bias_E
    scores_TE = logits_TE.softmax(-1)
    weight_TK, expert_TK = scores_TE.topk(top_k, dim=-1)
    weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
    return token_choice_decision(expert_TK, weight_TK, logits_TE, scores_TE, (1, x_TD.shape[0]))


def bench_skew(
    shape: LayerShape,
    dtype: torch.dtype,
    device: torch.device,
    skews: list[float],
    backends: list[str],
    repeats: int,
) -> list[dict[str, object]]:
    torch.manual_seed(0)
    experts = Experts(shape.num_experts, shape.d_model, shape.expert_hidden, "swiglu").to(device)
    gate = (torch.randn(shape.num_experts, shape.d_model) * shape.d_model**-0.5).to(device).requires_grad_()
    x0 = torch.randn(shape.tokens, shape.d_model, device=device)
    g = torch.randn(shape.tokens, shape.d_model, device=device)
    rows = []
    for skew in skews:
        with torch.no_grad():
            probe = biased_decision(x0, gate, skew, shape.top_k)
            load_E = probe.tokens_per_expert().float()
            capped = apply_capacity(probe, CAPACITY_FACTOR, "position", shape.top_k)
        fns = {}
        for name in backends:
            for capacity in (None, CAPACITY_FACTOR):

                def step(name=name, capacity=capacity, skew=skew) -> None:
                    experts.zero_grad(set_to_none=True)
                    gate.grad = None
                    x = x0.detach().requires_grad_()
                    with autocast_for(dtype, device):
                        d = apply_capacity(
                            biased_decision(x, gate, skew, shape.top_k), capacity, "position", shape.top_k
                        )
                        y = DISPATCHERS[name](x, d, experts)
                    (y.float() * g).sum().backward()

                fns[f"{name}{'' if capacity is None else '@cf1.25'}"] = step
        times = interleaved(fns, repeats=repeats, device=device)
        rows.append(
            {
                "skew": skew,
                "max_over_mean_load": float(load_E.max() / load_E.mean()),
                "drop_rate_cf1.25": float(capped.drop_rate),
                "fwdbwd_s": times,
            }
        )
    return rows

"""Auxiliary router losses: pure functions of a RoutingDecision.

Padding is ignored everywhere: tokens whose ``token_mask`` is False count in no mean
(other libraries average balance losses over padding, which biases them).

Normalisation of the load-balance loss (Fedus et al. 2021, Switch; Lepikhin et al. 2020,
GShard), as in transformers' Mixtral ``load_balancing_loss_func``::

    L_bal = E · Σ_i f_i · P_i,   f_i = (assignments to expert i) / T,   P_i = mean_t p_t(i)

f sums to K over experts, so L_bal = K at perfect balance and E when every token picks the same
K experts. We keep that normalisation (rather than dividing f by K, which would give 1 at
balance) so that coefficients carry over unchanged from Mixtral, OLMoE and Qwen-MoE configs.
f counts the router's choices before capacity drops: the loss judges the router, not the
capacity policy. Only P carries gradient.

z-loss (Zoph et al. 2022, ST-MoE): mean_t (logsumexp_i logits_t,i)², keeping logits small.

Legend: T tokens, E experts, A assignments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moelab.moe.decision import RoutingDecision
from moelab.registry import Registry

LossFn = Callable[[RoutingDecision], Tensor]
BALANCE_LOSSES: Registry[LossFn] = Registry("balance loss")


def valid_tokens(decision: RoutingDecision) -> Tensor:
    """``[T]`` bool: tokens that are not padding."""
    if decision.token_mask is None:
        return torch.ones(decision.num_tokens, dtype=torch.bool, device=decision.logits.device)
    return decision.token_mask.reshape(-1).bool()


def masked_token_mean(values_T: Tensor, valid_T: Tensor) -> Tensor:
    """Mean of ``values_T[...]`` over valid tokens (0 when there are none)."""
    w = valid_T.to(values_T.dtype)
    while w.dim() < values_T.dim():
        w = w.unsqueeze(-1)
    return (values_T * w).sum(0) / w.sum().clamp_min(1.0)


def expert_fraction(decision: RoutingDecision) -> Tensor:
    """``[E]`` f_i: assignments (before drops) to expert i per valid token; sums to K."""
    valid_T = valid_tokens(decision)
    valid_A = valid_T[decision.token]
    counts_E = torch.bincount(decision.expert[valid_A], minlength=decision.num_experts)
    return counts_E.to(torch.float32) / valid_T.sum().clamp_min(1)


@BALANCE_LOSSES.register("load_balance")
def load_balance_loss(decision: RoutingDecision) -> Tensor:
    """Switch/GShard balance loss ``E · Σ_i f_i · P_i`` (K at balance, E at collapse)."""
    prob_E = masked_token_mean(decision.scores, valid_tokens(decision))
    return decision.num_experts * (expert_fraction(decision) * prob_E).sum()


@BALANCE_LOSSES.register("none")
def no_balance_loss(decision: RoutingDecision) -> Tensor:
    """No balance loss (e.g. aux-loss-free balancing by bias, or hash routing)."""
    return decision.logits.new_zeros(())


def z_loss(decision: RoutingDecision) -> Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)²`` over valid tokens."""
    log_z_T = torch.logsumexp(decision.logits.float(), dim=-1)
    return masked_token_mean(log_z_T.square(), valid_tokens(decision))

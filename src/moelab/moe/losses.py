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

Sequence-wise balance loss (DeepSeek-V3 eq. 17-20; DeepSeek-V2's expert-level loss per
sequence): per sequence of S valid tokens, ``Σ_i f_i·P_i`` with ``f_i = E/(K·S)·#{t: i chosen}``
and ``P_i = mean_t s'_t,i``, ``s'`` the scores normalised to sum to 1 per token; averaged over
sequences. 1 at balance (the paper's normalisation: its α values carry over).

Importance and load losses (Shazeer et al. 2017 eq. 6-10): ``CV(v)² = Var(v)/mean(v)²``
(population variance) of ``Importance_i = Σ_t G_t,i`` (combine weights) and of the smooth load
``Load_i = Σ_t Φ((x·W_g)_t,i − kth_excluding(H_t, K, i)) / σ_t,i)``; the latter needs the noisy
top-k router's evidence (:class:`~moelab.moe.routers.noisy_topk.NoisyRoutingDecision`).

Every loss is registered by name; ``moe.aux_loss`` picks the main one and ``moe.seq_aux_coef``,
``moe.importance_coef``, ``moe.load_coef`` add others (see ``MoEConfig.loss_coefs``).
``z_loss`` is looked up by :func:`router_loss` beside them.

Legend: T tokens, E experts, A assignments, B sequences, S tokens per sequence, K experts per token.
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


def router_loss(name: str) -> LossFn:
    """The loss function called ``name``: a balance loss or ``z_loss``."""
    return z_loss if name == "z_loss" else BALANCE_LOSSES[name]


def cv_squared(values_E: Tensor, eps: float = 1e-10) -> Tensor:
    """``Var(v) / (mean(v)² + eps)`` with the population variance (Shazeer et al. 2017)."""
    mean = values_E.mean()
    return ((values_E - mean).square().mean()) / (mean.square() + eps)


@BALANCE_LOSSES.register("seq_aux")
def sequence_balance_loss(decision: RoutingDecision) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss ``mean_b Σ_i f_b,i · P_b,i`` (1 at balance)."""
    B, S = decision.batch_shape
    E = decision.num_experts
    valid_T = valid_tokens(decision)
    valid_A = valid_T[decision.token]
    seq_A = decision.token[valid_A] // S
    counts_BE = torch.zeros(B, E, device=decision.logits.device)
    counts_BE.index_put_((seq_A, decision.expert[valid_A]), torch.ones_like(seq_A, dtype=counts_BE.dtype), accumulate=True)
    tokens_B = valid_T.view(B, S).sum(-1).to(counts_BE.dtype)
    k = decision.num_assignments / max(decision.num_tokens, 1)  # K for token choice; mean picks for expert choice
    f_BE = counts_BE * E / (k * tokens_B.clamp_min(1.0)).unsqueeze(-1)
    s_TE = decision.scores.float()
    s_TE = s_TE / s_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    s_BSE = (s_TE * valid_T.unsqueeze(-1)).view(B, S, E)
    P_BE = s_BSE.sum(1) / tokens_B.clamp_min(1.0).unsqueeze(-1)
    per_seq_B = (f_BE * P_BE).sum(-1)
    has_tokens_B = tokens_B > 0
    return (per_seq_B * has_tokens_B).sum() / has_tokens_B.sum().clamp_min(1)


@BALANCE_LOSSES.register("importance")
def importance_loss(decision: RoutingDecision) -> Tensor:
    """Shazeer et al. importance loss ``CV(Σ_t G_t)²``, G the combine weights (any router)."""
    valid_A = valid_tokens(decision)[decision.token]
    importance_E = torch.zeros(decision.num_experts, device=decision.weight.device, dtype=torch.float32)
    importance_E = importance_E.index_add(0, decision.expert, decision.weight.float() * valid_A)
    return cv_squared(importance_E)


def smooth_load(decision: RoutingDecision) -> Tensor:
    """``[E]`` Shazeer et al. eq. 8-10: expected load under the noise, differentiable.

    ``P_t,i = Φ((clean_t,i − threshold_t,i) / σ_t,i)`` where the threshold is the K-th largest
    noisy logit excluding i: the (K+1)-th when i is among the chosen K, else the K-th.
    """
    noisy_TE = getattr(decision, "noisy_logits", None)
    std_TE = getattr(decision, "noise_std", None)
    if noisy_TE is None or std_TE is None:
        from moelab.config import ConfigError

        raise ConfigError(
            "moe.aux_loss/moe.load_coef: the smooth 'load' loss needs the noise evidence of "
            "moe.router.name='noisy_topk'; use 'load_balance' or 'importance' with other routers"
        )
    k = decision.top_k  # type: ignore[attr-defined]
    top_TK1 = noisy_TE.topk(k + 1, dim=-1).values
    kth_T1, kth_plus_one_T1 = top_TK1[:, k - 1 : k], top_TK1[:, k : k + 1]
    chosen_TE = torch.zeros_like(noisy_TE, dtype=torch.bool)
    chosen_TE[decision.token, decision.expert] = True
    threshold_TE = torch.where(chosen_TE, kth_plus_one_T1, kth_T1)
    prob_TE = torch.special.ndtr((decision.logits - threshold_TE) / std_TE)  # Φ, the standard normal CDF
    return (prob_TE * valid_tokens(decision).unsqueeze(-1)).sum(0)


@BALANCE_LOSSES.register("load")
def load_loss(decision: RoutingDecision) -> Tensor:
    """Shazeer et al. load loss ``CV(smooth load)²`` (noisy top-k router only)."""
    return cv_squared(smooth_load(decision))

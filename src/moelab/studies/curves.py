"""Pure helpers on loss-vs-FLOPs curves: the compute multiplier of the iso-flop study.

Why a module of its own: the multiplier is the study's headline number, so its interpolation
rule is written once here and tested against hand-computed values.

Shapes: a curve is two equal-length lists ``flops_P`` (increasing) and ``loss_P`` (P eval points).
"""

from __future__ import annotations

import math


def flops_to_reach(flops_P: list[float], loss_P: list[float], target: float) -> float | None:
    """Training FLOPs at which the curve first reaches ``target`` loss, linear in log FLOPs.

    Returns None when the curve never gets down to ``target`` (the caller then reports a lower
    bound, never an extrapolated number). When the first point is already at or below the target
    its FLOPs are returned (the earliest point we measured).
    """
    if len(flops_P) != len(loss_P) or not flops_P:
        raise ValueError("flops and loss must be non-empty and of equal length")
    if loss_P[0] <= target:
        return flops_P[0]
    for i in range(1, len(flops_P)):
        if loss_P[i] <= target:
            l0, l1 = loss_P[i - 1], loss_P[i]
            x0, x1 = math.log(flops_P[i - 1]), math.log(flops_P[i])
            t = (l0 - target) / (l0 - l1)
            return math.exp(x0 + t * (x1 - x0))
    return None


def compute_multiplier(
    dense_flops_P: list[float], dense_loss_P: list[float], moe_flops: float, moe_loss: float
) -> tuple[float, bool]:
    """Dense FLOPs needed to reach the MoE's final loss ÷ the MoE's FLOPs.

    Returns ``(multiplier, is_lower_bound)``: when the dense curve never reaches the MoE's loss
    the multiplier is the dense's final FLOPs ÷ MoE FLOPs and is only a lower bound.
    """
    need = flops_to_reach(dense_flops_P, dense_loss_P, moe_loss)
    if need is None:
        return dense_flops_P[-1] / moe_flops, True
    return need / moe_flops, False


def multiplier_verdict(ms: list[float], k: float = 2.0) -> tuple[str, str]:
    """Is the compute multiplier > 1 beyond the seed spread?

    ``supported`` when mean − k·std > 1, ``not supported`` when mean + k·std < 1, otherwise
    ``inconclusive`` (also with fewer than 2 seeds: no spread can be measured).
    """
    if len(ms) < 2:
        return "inconclusive", "fewer than 2 seeds: no seed spread"
    mean = sum(ms) / len(ms)
    std = math.sqrt(sum((m - mean) ** 2 for m in ms) / (len(ms) - 1))
    reason = f"multiplier {mean:.3f} ± {std:.3f} (std over seeds) vs 1 with margin {k:g}x std"
    if mean - k * std > 1:
        return "supported", reason
    if mean + k * std < 1:
        return "not supported", reason
    return "inconclusive", reason

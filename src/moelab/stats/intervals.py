"""Intervals (t, Welch, percentile bootstrap) and tests (t, sign, sign-flip and label permutation, Holm)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from moelab.stats._common import _CHUNK, _EXACT_SIGN_FLIP_MAX_N, _array, _check_count, _check_level, _json

# -------------------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    """A confidence interval ``[low, high]`` at ``level``; ``method`` is "t", "welch" or
    "bootstrap-percentile". Both bounds are NaN when the data cannot give one (fewer than 2 values)."""

    low: float
    high: float
    level: float
    method: str

    @classmethod
    def undefined(cls, level: float, method: str) -> Interval:
        return cls(math.nan, math.nan, level, method)

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def contains(self, x: float) -> bool:
        return self.defined and self.low <= x <= self.high

    def to_json(self) -> dict[str, Any]:
        return {"low": _json(self.low), "high": _json(self.high), "level": self.level, "method": self.method}


def _symmetric(center: float, se: float, df: float, level: float, method: str) -> Interval:
    if se == 0.0:  # no spread at all: the interval collapses onto the estimate
        return Interval(center, center, level, method)
    q = float(sps.t.ppf(0.5 + level / 2.0, df))
    return Interval(center - q * se, center + q * se, level, method)


def _t_p(center: float, se: float, df: float) -> float:
    """Two-sided p of ``center / se`` under Student's t with ``df``; the zero-spread limit is 0 or 1."""
    if se == 0.0:
        return 0.0 if center != 0.0 else 1.0
    return float(min(1.0, 2.0 * sps.t.sf(abs(center / se), df)))


def _one_sample(xs: Sequence[float] | np.ndarray) -> tuple[float, float, float] | None:
    x = _array(xs, "xs")
    if x.size < 2:
        return None
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)), float(x.size - 1)


def t_interval(xs: Sequence[float] | np.ndarray, level: float = 0.95) -> Interval:
    """Student t interval of the mean of ``xs`` (for paired comparisons: of the per-seed differences)."""
    _check_level(level)
    stats = _one_sample(xs)
    return Interval.undefined(level, "t") if stats is None else _symmetric(*stats, level, "t")


def t_test(xs: Sequence[float] | np.ndarray) -> float:
    """Two-sided p of the one-sample t test of mean 0 (NaN with fewer than 2 values)."""
    stats = _one_sample(xs)
    return math.nan if stats is None else _t_p(*stats)


def _welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float] | None:
    """(mean(a) - mean(b), its standard error, Welch-Satterthwaite df); None if an arm has < 2 values."""
    x, y = _array(a, "a"), _array(b, "b")
    if x.size < 2 or y.size < 2:
        return None
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1)) if se > 0 else math.inf
    return float(x.mean() - y.mean()), se, float(df)


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Welch t interval of ``mean(a) - mean(b)`` for unpaired arms (variances not assumed equal)."""
    _check_level(level)
    stats = _welch(a, b)
    return Interval.undefined(level, "welch") if stats is None else _symmetric(*stats, level, "welch")


def welch_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of Welch's unequal-variance t test (NaN when an arm has fewer than 2 values)."""
    stats = _welch(a, b)
    return math.nan if stats is None else _t_p(*stats)


def _percentile(replicates: np.ndarray, level: float) -> Interval:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return Interval(float(low), float(high), level, "bootstrap-percentile")


def _resampled_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` means of ``x`` resampled with replacement, shape [n_boot]."""
    out = np.empty(n_boot)
    step = max(1, _CHUNK // x.size)
    for start in range(0, n_boot, step):
        k = min(step, n_boot - start)
        out[start : start + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    return out


def bootstrap_interval(
    xs: Sequence[float] | np.ndarray, level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean of ``xs`` (deterministic for a given ``seed``).
    For paired comparisons ``xs`` are the differences, so whole pairs are resampled."""
    _check_level(level)
    _check_count(n_boot, "n_boot")
    x = _array(xs, "xs")
    if x.size < 2:
        return Interval.undefined(level, "bootstrap-percentile")
    return _percentile(_resampled_means(x, n_boot, np.random.default_rng(seed)), level)


def bootstrap_difference_interval(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of ``mean(a) - mean(b)`` for unpaired arms: each arm is
    resampled on its own, since no value of ``a`` belongs with a value of ``b``."""
    _check_level(level)
    _check_count(n_boot, "n_boot")
    x, y = _array(a, "a"), _array(b, "b")
    if x.size < 2 or y.size < 2:
        return Interval.undefined(level, "bootstrap-percentile")
    rng = np.random.default_rng(seed)
    return _percentile(_resampled_means(x, n_boot, rng) - _resampled_means(y, n_boot, rng), level)


# ------------------------------------------------------------------------------------------ tests


def sign_test(diffs: Sequence[float] | np.ndarray) -> float:
    """Exact two-sided sign test: are positive and negative differences equally likely? Zeros are
    dropped. Uses only the direction of each seed, so one wild seed cannot drive it. NaN if empty,
    1.0 if every difference is zero."""
    d = _array(diffs, "diffs")
    if d.size == 0:
        return math.nan
    above, below = int((d > 0).sum()), int((d < 0).sum())
    m = above + below
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(above, below) + 1)) / 2**m
    return min(1.0, 2.0 * tail)


def _two_sided(null: np.ndarray, observed: float, tol: float, exact: bool) -> float:
    """``2 * min(P(T <= t), P(T >= t))`` over the null statistics (ties within ``tol`` count); a
    random null counts the observed arrangement as one of its draws so that p is never 0."""
    less, greater = int((null <= observed + tol).sum()), int((null >= observed - tol).sum())
    extra = 0 if exact else 1
    p_less, p_greater = (less + extra) / (null.size + extra), (greater + extra) / (null.size + extra)
    return min(1.0, 2.0 * min(p_less, p_greater))


def sign_flip_test(diffs: Sequence[float] | np.ndarray, n_perm: int = 20_000, seed: int = 0) -> float:
    """Permutation test of mean difference 0 for paired data: under the null, swapping the two arms
    within a seed is as likely as not, so each difference's sign is flipped at random. Exact over
    all 2**n sign patterns when n <= 16, else ``n_perm`` random patterns. Two-sided; NaN if empty."""
    _check_count(n_perm, "n_perm")
    d = _array(diffs, "diffs")
    n = d.size
    if n == 0:
        return math.nan
    tol = 1e-9 * float(np.abs(d).sum())
    exact = n <= _EXACT_SIGN_FLIP_MAX_N
    if exact:
        signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        null = signs @ d
    else:
        rng = np.random.default_rng(seed)
        step = max(1, _CHUNK // n)
        null = np.concatenate(
            [rng.choice([-1.0, 1.0], size=(min(step, n_perm - s), n)) @ d for s in range(0, n_perm, step)]
        )
    return _two_sided(null, float(d.sum()), tol, exact)


def label_permutation_test(
    a: Sequence[float], b: Sequence[float], n_perm: int = 20_000, seed: int = 0
) -> float:
    """Permutation test of ``mean(a) - mean(b)`` for unpaired arms: under the null the arm labels
    are exchangeable. Exact over every split when there are at most ``n_perm`` of them, else
    ``n_perm`` random splits. Two-sided; NaN when an arm is empty."""
    _check_count(n_perm, "n_perm")
    x, y = _array(a, "a"), _array(b, "b")
    if x.size == 0 or y.size == 0:
        return math.nan
    pooled = np.concatenate([x, y])
    total, na, nb = pooled.sum(), x.size, y.size
    exact = math.comb(pooled.size, na) <= n_perm
    if exact:
        groups = np.array(list(itertools.combinations(range(pooled.size), na)), dtype=np.int64)
    else:
        groups = np.argsort(np.random.default_rng(seed).random((n_perm, pooled.size)), axis=1)[:, :na]
    sum_a = pooled[groups].sum(axis=1)
    null = sum_a / na - (total - sum_a) / nb
    tol = 1e-9 * float(np.abs(pooled).max())
    return _two_sided(null, float(x.mean() - y.mean()), tol, exact)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: sort ascending, multiply the i-th
    smallest (i from 0) by ``m - i``, make the sequence non-decreasing, cap at 1. Rejecting where the
    adjusted p < alpha keeps the family-wise error at alpha. NaN entries stay NaN and do not count
    in ``m``."""
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be a flat list, got an array of shape {p.shape}")
    valid = ~np.isnan(p)
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(valid)
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (idx.size - rank) * p[i]))
        out[i] = running
    return out.tolist()



"""The saturating power law of loss against compute, and the compute multiplier read off it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize

from moelab.stats._common import _array, _check_count, _check_level, _json
from moelab.stats.intervals import Interval, _resampled_means, t_interval

# ------------------------------------------------------------------------ curve fits, multiplier


@dataclass(frozen=True)
class PowerLaw:
    """``L(x) = a * (x / x0) ** (-b) + c``: a loss falling with compute ``x`` towards the floor ``c``.
    ``x0`` is a fixed scale (the smallest fitted x) so that ``a`` is the excess loss there; ``rmse``
    is the fit's root-mean-square residual in loss units."""

    a: float
    b: float
    c: float
    x0: float
    rmse: float = math.nan

    def __call__(self, x: float) -> float:
        return self.a * (x / self.x0) ** (-self.b) + self.c

    def inverse(self, loss: float) -> float | None:
        """The x with ``L(x) = loss``; None when the curve never gets there (loss <= c, or a flat fit)."""
        if self.a <= 0 or self.b <= 0 or loss <= self.c:
            return None
        x = self.x0 * ((loss - self.c) / self.a) ** (-1.0 / self.b)
        return float(x) if math.isfinite(x) else None

    def to_json(self) -> dict[str, Any]:
        return {name: _json(getattr(self, name)) for name in self.__dataclass_fields__}


def _best_linear(g: np.ndarray, y: np.ndarray, c_max: float | None) -> tuple[float, float, float]:
    """Least squares of ``y ~ a * g + c`` with ``a >= 0`` and ``0 <= c <= c_max`` (``c = 0`` when
    ``c_max`` is None): a convex problem over a box, so its minimum is the free solution if feasible,
    else the best clipped solution on one of the faces. Returns (sse, a, c)."""

    def on_c(c: float) -> tuple[float, float]:
        return max(0.0, float(g @ (y - c)) / float(g @ g)), c

    candidates = [on_c(0.0)]
    if c_max is not None:
        candidates += [on_c(c_max), (0.0, min(max(float(y.mean()), 0.0), c_max))]
        (a, c), *_ = np.linalg.lstsq(np.stack([g, np.ones_like(g)], axis=1), y, rcond=None)
        if a >= 0 and 0 <= c <= c_max:
            candidates.append((float(a), float(c)))
    fits = [(float(((a * g + c - y) ** 2).sum()), a, c) for a, c in candidates]
    return min(fits, key=lambda f: f[0])


def fit_power_law(x: Sequence[float], y: Sequence[float], floor: bool = True) -> PowerLaw:
    """Least-squares fit (in loss space) of ``y = a * (x / x0) ** (-b) + c`` with ``x0 = min(x)``,
    ``a >= 0``, ``b > 0`` and ``0 <= c < min(y)`` (``floor=False`` or fewer than 4 distinct x: c = 0).

    For a fixed exponent b the model is linear in (a, c), so the fit profiles the error over b: a
    log-spaced grid of exponents, then a bounded Brent search around the best one. No random start,
    so the fit is deterministic. Needs at least 3 distinct positive x and positive finite losses."""
    xs, ys = _array(x, "x"), _array(y, "y")
    if xs.size != ys.size:
        raise ValueError(f"x and y must have the same length, got {xs.size} and {ys.size}")
    if np.any(xs <= 0) or np.any(ys <= 0):
        raise ValueError("a power-law fit needs positive x (compute) and positive y (loss)")
    order = np.lexsort((ys, xs))  # a fixed order makes the result independent of the input order
    xs, ys = xs[order], ys[order]
    distinct = np.unique(xs).size
    if distinct < 3:
        raise ValueError(f"a power-law fit needs at least 3 distinct x values, got {distinct}")
    x0 = float(xs.min())
    u = np.log(xs / x0)
    y_min = float(ys.min())
    c_max = y_min - 1e-9 * max(y_min, float(ys.max() - y_min)) if floor and distinct >= 4 else None
    c_max = c_max if c_max is not None and c_max > 0 else None

    def solve(log_b: float) -> tuple[float, float, float]:
        return _best_linear(np.exp(-math.exp(log_b) * u), ys, c_max)

    grid = np.linspace(math.log(1e-4), math.log(20.0), 241)
    best = int(np.argmin([solve(lb)[0] for lb in grid]))
    lo, hi = grid[max(0, best - 1)], grid[min(grid.size - 1, best + 1)]
    res = optimize.minimize_scalar(lambda lb: solve(lb)[0], bounds=(lo, hi), method="bounded",
                                   options={"xatol": 1e-12})
    log_b = float(res.x) if solve(float(res.x))[0] <= solve(float(grid[best]))[0] else float(grid[best])
    sse, a, c = solve(log_b)
    return PowerLaw(a=a, b=math.exp(log_b), c=c, x0=x0, rmse=math.sqrt(sse / xs.size))


@dataclass(frozen=True)
class Multiplier:
    """How many times the MoE's training FLOPs the dense family needs to reach the MoE's loss.

    ``per_seed[s]`` = (dense FLOPs at the MoE's loss on seed s's dense fit) / (the MoE's FLOPs on seed
    s); ``inf`` where that loss is below the fitted floor (``unreachable``). ``extrapolated`` marks a
    loss outside the range the seed's dense ladder measured (the fit is read beyond its data).
    ``interval`` resamples seeds (percentile bootstrap of the geometric mean; too narrow with 2-3
    seeds); ``t_interval`` is the t interval of the mean log multiplier, exponentiated."""

    per_seed: tuple[float, ...]
    extrapolated: tuple[bool, ...]
    unreachable: tuple[bool, ...]
    geometric_mean: float
    interval: Interval
    fits: tuple[PowerLaw, ...]
    dense_flops_needed: tuple[float, ...] = ()
    t_interval: Interval | None = None

    def to_json(self) -> dict[str, Any]:
        return {name: _json(getattr(self, name)) for name in self.__dataclass_fields__}


def compute_multiplier(
    dense_flops: Sequence[Sequence[float]], dense_loss: Sequence[Sequence[float]],
    moe_flops: Sequence[float], moe_loss: Sequence[float],
    level: float = 0.95, n_boot: int = 10_000, seed: int = 0,
) -> Multiplier:
    """Dense ladder per seed (``dense_flops[s]``, ``dense_loss[s]``: complete runs at each budget)
    against the MoE's (FLOPs, loss) on the same seed. See :class:`Multiplier`."""
    _check_level(level)
    _check_count(n_boot, "n_boot")
    n = len(moe_loss)
    if n == 0 or not len(dense_flops) == len(dense_loss) == len(moe_flops) == n:
        raise ValueError(
            "compute_multiplier needs one dense ladder and one MoE point per seed: got "
            f"{len(dense_flops)} dense FLOP lists, {len(dense_loss)} dense loss lists, "
            f"{len(moe_flops)} MoE FLOPs and {n} MoE losses"
        )
    m_flops, m_loss = _array(moe_flops, "moe_flops"), _array(moe_loss, "moe_loss")
    if np.any(m_flops <= 0):
        raise ValueError(f"moe_flops must be positive, got {m_flops.tolist()}")
    fits = tuple(fit_power_law(f, ys) for f, ys in zip(dense_flops, dense_loss))
    needed = [fit.inverse(float(loss)) for fit, loss in zip(fits, m_loss)]
    per_seed = np.array([math.inf if x is None else x / f for x, f in zip(needed, m_flops)])
    extrapolated = tuple(not min(ys) <= loss <= max(ys) for ys, loss in zip(dense_loss, m_loss.tolist()))
    logs = np.log(per_seed)
    interval, t_iv = Interval.undefined(level, "bootstrap-percentile"), Interval.undefined(level, "t")
    if n >= 2:
        big = 1e300  # stands in for log(inf): replicates that drew an unreachable seed stay ordered
        reps = _resampled_means(np.where(np.isfinite(logs), logs, big), n_boot, np.random.default_rng(seed))
        ends = np.quantile(np.minimum(reps, big), [(1 - level) / 2, (1 + level) / 2])
        low, high = (math.inf if v >= big / (n + 1) else math.exp(v) for v in ends)
        interval = Interval(low, high, level, "bootstrap-percentile")
        if np.all(np.isfinite(logs)):
            lt = t_interval(logs, level)
            t_iv = Interval(math.exp(lt.low), math.exp(lt.high), level, "t")
    return Multiplier(
        per_seed=tuple(per_seed.tolist()), extrapolated=extrapolated,
        unreachable=tuple(x is None for x in needed),
        geometric_mean=float(math.exp(logs.mean())), interval=interval, fits=fits,
        dense_flops_needed=tuple(math.inf if x is None else x for x in needed), t_interval=t_iv,
    )

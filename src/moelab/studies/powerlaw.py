"""Pure helpers of the sqrt-rule study: the loss(N) power law and the α regression.

Loss vs size is fitted as ``L(N) = a·N^(-b) + c``: for each candidate floor ``c`` on a grid in
[0, min L), ``log(L − c) = log a − b·log N`` is an ordinary least-squares line; the ``c`` with the
least squared error in loss space wins. The dense-equivalent size of a loss is the inverse
``N = (a / (L − c))^(1/b)``. The rule ``N_eq = active^α · total^(1−α)`` is, in logs,
``log(N_eq/total) = α·log(active/total)``: a line through the origin, α by least squares with its
standard error.
"""

from __future__ import annotations

import math


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def fit_power_law(ns: list[float], losses: list[float], grid: int = 200) -> tuple[float, float, float]:
    """``(a, b, c)`` of ``L = a·N^(-b) + c`` fitted to points (needs ≥ 3 distinct sizes)."""
    if len(set(ns)) < 3 or len(ns) != len(losses):
        raise ValueError("need >= 3 distinct sizes and one loss per size")
    xs = [math.log(n) for n in ns]
    lo = min(losses)
    best: tuple[float, float, float, float] | None = None
    for i in range(grid):
        c = lo * i / grid
        icpt, slope = _line(xs, [math.log(v - c) for v in losses])
        a, b = math.exp(icpt), -slope
        sse = sum((a * n ** (-b) + c - v) ** 2 for n, v in zip(ns, losses))
        if best is None or sse < best[0]:
            best = (sse, a, b, c)
    assert best is not None
    return best[1], best[2], best[3]


def equivalent_size(a: float, b: float, c: float, loss: float) -> float | None:
    """The N at which the fitted curve reaches ``loss``; None when it never does (loss ≤ c or b ≤ 0)."""
    if b <= 0 or loss <= c:
        return None
    return (a / (loss - c)) ** (1.0 / b)


def fit_alpha(active: list[float], total: list[float], n_eq: list[float]) -> tuple[float, float]:
    """α and its standard error from ``log(N_eq/total) = α·log(active/total)`` (through the origin)."""
    xs = [math.log(a / t) for a, t in zip(active, total)]
    ys = [math.log(n / t) for n, t in zip(n_eq, total)]
    sxx = sum(x * x for x in xs)
    if len(xs) < 2 or sxx == 0:
        raise ValueError("need >= 2 points with active != total")
    alpha = sum(x * y for x, y in zip(xs, ys)) / sxx
    sse = sum((y - alpha * x) ** 2 for x, y in zip(xs, ys))
    return alpha, math.sqrt(sse / (len(xs) - 1) / sxx)


def alpha_verdict(alpha: float, se: float, k: float = 2.0, too_wide: float = 0.5) -> tuple[str, str]:
    """The sqrt rule is α = 0.5. Interval α ± k·se: ``inconclusive`` when its half-width exceeds
    ``too_wide`` (it cannot tell 0.5 from the ends 0 / 1), else ``supported`` when it contains 0.5,
    ``not supported`` when it excludes it."""
    lo, hi = alpha - k * se, alpha + k * se
    reason = f"alpha {alpha:.3f}, interval [{lo:.3f}, {hi:.3f}] ({k:g} standard errors)"
    if k * se > too_wide:
        return "inconclusive", reason + f"; half-width > {too_wide:g}: too wide"
    if lo <= 0.5 <= hi:
        return "supported", reason + "; contains 0.5"
    return "not supported", reason + "; excludes 0.5"

"""Pure helpers of the sqrt-rule study: the loss(N) power law and the α regression.

Loss vs size is fitted as ``L(N) = a·N^(-b) + c``: for each candidate floor ``c`` on a grid in
[0, min L), ``log(L − c) = log a − b·log N`` is an ordinary least-squares line; the ``c`` with the
least squared error in loss space wins. The dense-equivalent size of a loss is the inverse
``N = (a / (L − c))^(1/b)``. The rule ``N_eq = active^α · total^(1−α)`` is, in logs,
``log(N_eq/total) = α·log(active/total)``: a line through the origin, α by least squares with its
standard error. :class:`AlphaRule` decides the claim α = 0.5 from one α per seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from moelab.stats import t_interval


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


@dataclass(frozen=True)
class AlphaRule:
    """The sqrt rule as a decision: α = ``target`` within ``tolerance``, judged by the t interval
    (at ``level``) of the mean of one α per seed (each seed's own dense fit and MoEs, so seed-to-seed
    variation in the fits carries into the interval).

    supported: the whole interval inside ``target ± tolerance``; not supported: the whole interval
    outside it; inconclusive otherwise, and with fewer than 2 seeds that have an α.
    """

    target: float = 0.5
    tolerance: float = 0.25
    level: float = 0.95

    def describe(self) -> str:
        return (
            f"alpha within {self.target:g} ± {self.tolerance:g}: the {self.level:.0%} interval of the mean "
            "per-seed alpha (the t interval over seeds, widened to cover the whole-pipeline bootstrap interval "
            "when the page has one) inside that band (supported), outside it (not supported), else inconclusive"
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "metric": "alpha", "description": self.describe()}

    def decide(
        self, alphas: Sequence[float], bootstrap: tuple[float, float] | None = None
    ) -> tuple[str, str, dict[str, Any]]:
        """``(verdict, sentence, detail)`` from the per-seed α values; ``bootstrap`` (low, high): the
        whole-pipeline bootstrap interval, which widens the t interval where it reaches further (the t
        interval sees only seed-to-seed spread, not the ladder fit's own error)."""
        n = len(alphas)
        band = (self.target - self.tolerance, self.target + self.tolerance)
        detail: dict[str, Any] = {"alpha_per_seed": list(alphas), "n": n, "band": list(band)}
        if n < 2:
            return "inconclusive", f"alpha from {n} seed(s): fewer than 2, no interval: inconclusive", detail
        mean = sum(alphas) / n
        iv = t_interval(alphas, self.level)
        detail.update(mean=mean, t_interval=iv.to_json())
        if bootstrap is not None:
            detail["bootstrap_interval"] = {"low": bootstrap[0], "high": bootstrap[1], "level": self.level,
                                            "method": "bootstrap over seeds and validation batches"}  # fmt: skip
            iv = replace(iv, low=min(iv.low, bootstrap[0]), high=max(iv.high, bootstrap[1]), method="t ∪ bootstrap")
        detail["interval"] = iv.to_json()
        if band[0] <= iv.low and iv.high <= band[1]:
            verdict = "supported"
        elif iv.high < band[0] or iv.low > band[1]:
            verdict = "not supported"
        else:
            verdict = "inconclusive"
        sentence = (
            f"alpha = {mean:.3f} [{iv.low:.3f}, {iv.high:.3f}] ({self.level:.0%} {iv.method} interval over {n} seeds; "
            f"per seed {', '.join(f'{a:.3f}' for a in alphas)}) vs the band "
            f"[{band[0]:g}, {band[1]:g}]: {verdict}"
        )
        return verdict, sentence, detail

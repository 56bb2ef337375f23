"""Comparisons of two arms over seeds, the declared rule of a claim and the verdict computed from it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moelab.stats._common import _array, _json
from moelab.stats.intervals import (
    Interval,
    bootstrap_difference_interval,
    bootstrap_interval,
    holm,
    label_permutation_test,
    sign_flip_test,
    sign_test,
    t_interval,
    t_test,
    welch_interval,
    welch_test,
)

# ------------------------------------------------------------------------------------ comparisons


@dataclass(frozen=True)
class Comparison:
    """Arm ``a`` against arm ``b`` on one metric over seeds; ``mean`` is ``mean(a) - mean(b)``.

    Paired: ``diffs[s] = a[s] - b[s]``, the intervals and tests are on the diffs, ``n`` counts pairs.
    Unpaired: ``diffs == ()``, Welch interval and test, label permutation, ``sd`` / ``p_sign`` NaN,
    ``n = min(len(a), len(b))`` and ``n_below == n_above == 0``."""

    a: str
    b: str
    metric: str
    paired: bool
    a_values: tuple[float, ...]
    b_values: tuple[float, ...]
    diffs: tuple[float, ...]
    mean: float
    sd: float
    n: int
    t_interval: Interval
    bootstrap_interval: Interval
    p_t: float
    p_sign: float
    p_permutation: float
    n_below: int
    n_above: int

    def to_json(self) -> dict[str, Any]:
        return {name: _json(getattr(self, name)) for name in self.__dataclass_fields__}


def paired_difference(
    a: Sequence[float], b: Sequence[float], a_name: str = "a", b_name: str = "b", metric: str = "",
    level: float = 0.95, n_boot: int = 10_000, seed: int = 0, n_perm: int = 20_000,
) -> Comparison:
    """Compare arms whose i-th values share seed i (same data order, same validation batches).
    Raises ValueError when the arms have different lengths: pairs need the same seeds in both."""
    x, y = _array(a, a_name), _array(b, b_name)
    if x.size != y.size:
        raise ValueError(
            f"a paired comparison needs one value per seed in both arms: {a_name} has {x.size}, "
            f"{b_name} has {y.size}; run the same seeds for both or use an unpaired rule"
        )
    d = x - y
    return Comparison(
        a=a_name, b=b_name, metric=metric, paired=True,
        a_values=tuple(x.tolist()), b_values=tuple(y.tolist()), diffs=tuple(d.tolist()),
        mean=float(d.mean()) if d.size else math.nan,
        sd=float(d.std(ddof=1)) if d.size >= 2 else math.nan,
        n=int(d.size),
        t_interval=t_interval(d, level),
        bootstrap_interval=bootstrap_interval(d, level, n_boot, seed),
        p_t=t_test(d), p_sign=sign_test(d), p_permutation=sign_flip_test(d, n_perm, seed),
        n_below=int((d < 0).sum()), n_above=int((d > 0).sum()),
    )


def unpaired_difference(
    a: Sequence[float], b: Sequence[float], a_name: str = "a", b_name: str = "b", metric: str = "",
    level: float = 0.95, n_boot: int = 10_000, seed: int = 0, n_perm: int = 20_000,
) -> Comparison:
    """Compare arms whose values are not matched seed by seed (Welch t, resampling each arm)."""
    x, y = _array(a, a_name), _array(b, b_name)
    return Comparison(
        a=a_name, b=b_name, metric=metric, paired=False,
        a_values=tuple(x.tolist()), b_values=tuple(y.tolist()), diffs=(),
        mean=float(x.mean() - y.mean()) if x.size and y.size else math.nan,
        sd=math.nan, n=int(min(x.size, y.size)),
        t_interval=welch_interval(x, y, level),
        bootstrap_interval=bootstrap_difference_interval(x, y, level, n_boot, seed),
        p_t=welch_test(x, y), p_sign=math.nan, p_permutation=label_permutation_test(x, y, n_perm, seed),
        n_below=0, n_above=0,
    )


# -------------------------------------------------------------------------------- rules, verdicts


@dataclass(frozen=True)
class Rule:
    """A claim's decision rule, declared in code before the runs; the verdict is computed from it.
    The claim is "arm a is better than arm b on ``metric``": ``a - b < 0`` when ``lower_is_better``."""

    metric: str = "val_loss"
    lower_is_better: bool = True
    min_effect: float = 0.0  # smallest |a - b| (metric units) that counts as an effect
    alpha: float = 0.05
    paired: bool = True
    unit: str = "nats/token"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"Rule.alpha must lie strictly between 0 and 1, got {self.alpha}")
        if not (math.isfinite(self.min_effect) and self.min_effect >= 0.0):
            raise ValueError(f"Rule.min_effect must be a finite number >= 0, got {self.min_effect}")

    @property
    def direction(self) -> str:
        return "lower" if self.lower_is_better else "higher"

    def describe(self) -> str:
        floor = f" by >= {self.min_effect:g} {self.unit}".rstrip() if self.min_effect > 0 else ""
        test = "paired t" if self.paired else "Welch t"
        return f"{self.direction} {self.metric}{floor}, {test}, alpha {self.alpha:g} (Holm)"

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__} | {"description": self.describe()}


@dataclass(frozen=True)
class Verdict:
    """The computed verdict of one comparison under a rule, with the sentence a reader sees."""

    verdict: str
    sentence: str
    comparison: Comparison
    p_adjusted: float
    rule: Rule
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {name: _json(getattr(self, name)) for name in self.__dataclass_fields__}


def _decimals(c: Comparison) -> int:
    """Two significant digits of the interval's half-width (three of the mean without one)."""
    half = (c.t_interval.high - c.t_interval.low) / 2.0 if c.t_interval.defined else math.nan
    if math.isfinite(half) and half > 0:
        return min(8, max(0, 1 - math.floor(math.log10(half))))
    if math.isfinite(c.mean) and c.mean != 0:
        return min(8, max(0, 2 - math.floor(math.log10(abs(c.mean)))))
    return 3


def _num(x: float, decimals: int, sign: bool = False) -> str:
    return f"{x:{'+' if sign else ''}.{decimals}f}".replace("-", "−")


def _p_text(p: float) -> str:
    if not math.isfinite(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _sentence(rule: Rule, c: Comparison, p: float, holm_adjusted: bool, verdict: str) -> str:
    dec, unit = _decimals(c), f" {rule.unit}" if rule.unit else ""
    text = f"{c.a} − {c.b} = {_num(c.mean, dec, sign=True)}"
    if c.t_interval.defined:
        text += f" [{_num(c.t_interval.low, dec)}, {_num(c.t_interval.high, dec)}]{unit}"
    else:
        text += f"{unit} (no interval with {c.n} seed{'' if c.n == 1 else 's'})"
    if c.paired:
        count = f"{c.n_below if rule.lower_is_better else c.n_above}/{c.n} seeds {rule.direction}"
    else:
        count = f"unpaired, {len(c.a_values)} vs {len(c.b_values)} seeds"
    return f"{text}, {count}, {_p_text(p)}{' (Holm)' if holm_adjusted else ''}: {verdict}"


def _judge(rule: Rule, c: Comparison, p: float, holm_adjusted: bool) -> Verdict:
    """The decision table. CI at the comparison's level; ``p`` already Holm-adjusted if several."""
    claimed = -1.0 if rule.lower_is_better else 1.0
    side = math.copysign(1.0, c.mean) if c.mean != 0 else 0.0
    significant = math.isfinite(p) and p < rule.alpha
    iv, floor = c.t_interval, rule.min_effect
    other = "higher" if rule.lower_is_better else "lower"
    if c.n < 2:
        verdict, reason = "inconclusive", f"fewer than 2 seeds ({c.n}): no interval or test is possible"
    elif significant and side == claimed and abs(c.mean) >= floor:
        verdict = "supported"
        reason = f"p {p:.3g} < alpha {rule.alpha:g}, {c.a} {rule.direction} than {c.b}"
        reason += f", |difference| {abs(c.mean):.3g} >= floor {floor:g}" if floor > 0 else ""
    elif significant and side == -claimed:
        verdict = "not supported"
        reason = f"significant the other way: {c.a} {other} than {c.b} (p {p:.3g} < alpha {rule.alpha:g})"
    elif floor > 0 and iv.defined and -floor < iv.low and iv.high < floor:
        verdict = "not supported"
        reason = f"smaller than the floor: the whole {iv.level:.0%} interval lies inside ±{floor:g}"
    elif significant:
        verdict = "inconclusive"
        reason = (f"significant (p {p:.3g}) but |difference| {abs(c.mean):.3g} is below the floor {floor:g} "
                  "and the interval reaches beyond it")
    else:
        verdict = "inconclusive"
        reason = f"not significant: p {p:.3g} >= alpha {rule.alpha:g}"
        reason += ", and the interval reaches beyond the floor" if floor > 0 else ""
    return Verdict(verdict, _sentence(rule, c, p, holm_adjusted, verdict), c, p, rule, reason)


def _compare(rule: Rule, a: Sequence[float], b: Sequence[float], a_name: str, b_name: str,
             level: float, n_boot: int, seed: int) -> Comparison:
    diff = paired_difference if rule.paired else unpaired_difference
    return diff(a, b, a_name, b_name, rule.metric, level=level, n_boot=n_boot, seed=seed)


def decide(
    rule: Rule, a: Sequence[float], b: Sequence[float], a_name: str = "a", b_name: str = "b",
    p_adjusted: float | None = None, level: float | None = None, n_boot: int = 10_000, seed: int = 0,
) -> Verdict:
    """Verdict on "``a_name`` is better than ``b_name``" under ``rule`` (CI level ``1 - alpha`` unless
    given; ``p_adjusted`` replaces the t test's p, e.g. after Holm over several comparisons).

    fewer than 2 pairs -> inconclusive; p < alpha, claimed direction and |mean| >= min_effect ->
    supported; p < alpha the other way -> not supported; min_effect > 0 and the whole interval
    inside (-min_effect, +min_effect) -> not supported (smaller than the floor); else inconclusive."""
    c = _compare(rule, a, b, a_name, b_name, 1.0 - rule.alpha if level is None else level, n_boot, seed)
    p = c.p_t if p_adjusted is None else float(p_adjusted)
    return _judge(rule, c, p, holm_adjusted=p_adjusted is not None)


def decide_all(
    rule: Rule, pairs: Sequence[tuple[str, str, Sequence[float], Sequence[float]]],
    n_boot: int = 10_000, seed: int = 0,
) -> list[Verdict]:
    """Verdicts for several comparisons of one claim ``(a_name, b_name, a_values, b_values)``, with
    the t tests' p-values Holm-adjusted over the list (a single comparison is left unadjusted)."""
    comparisons = [_compare(rule, a, b, an, bn, 1.0 - rule.alpha, n_boot, seed) for an, bn, a, b in pairs]
    adjusted = holm([c.p_t for c in comparisons])
    return [_judge(rule, c, p, len(comparisons) > 1) for c, p in zip(comparisons, adjusted)]



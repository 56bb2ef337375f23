"""A study's claim as a declared rule, and its verdict computed from the per-seed numbers.

Why: a verdict is only worth reading if the rule that produced it was fixed before the numbers
were seen and is applied the same way every time. Each study module declares at top level an
:class:`ArmClaim` — "arm ``better`` beats each arm in ``than`` on ``rule.metric``" under a
:class:`moelab.stats.Rule` (direction, minimum effect in the metric's unit, alpha, paired) — and
its ``score(arms, numbers)`` applies it to the stored per-seed numbers with
:func:`moelab.stats.decide` (one comparison) or :func:`moelab.stats.decide_all` (several, Holm).
Scoring is pure, so ``moelab study NAME --rescore`` can re-score a committed page without training.

Paired over seeds: arms run with the same seed share their data order and validation batches, so
the per-seed difference cancels what makes one seed easy or hard for every arm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from moelab.stats import Comparison, Rule, Verdict, decide, decide_all, paired_difference
from moelab.studies.result import Scored


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made of several comparisons: supported when every comparison is,
    not supported when any is not, else inconclusive."""
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    if any(v == "not supported" for v in verdicts):
        return "not supported"
    return "inconclusive"


@dataclass(frozen=True)
class ArmClaim:
    """ "``better`` beats every arm in ``than`` on ``rule.metric``", with its rule, declared in code.

    ``rule.metric`` names the per-seed metric in each arm (``arms[name]["per_seed"][metric]``).
    Several ``than`` arms are one claim: p-values are Holm-adjusted over them and the verdict is
    :func:`combine` of theirs.
    """

    rule: Rule
    better: str
    than: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.than or self.better in self.than:
            raise ValueError(
                f"ArmClaim needs arms to compare {self.better!r} with, other than itself: got {self.than}"
            )

    def describe(self) -> str:
        rule = self.rule.describe()
        if len(self.than) == 1:  # Holm applies only to several comparisons
            rule = rule.replace(" (Holm)", "")
        return f"{self.better} vs {', '.join(self.than)}: {rule}"

    def to_json(self) -> dict[str, Any]:
        return {
            **self.rule.to_json(),
            "better": self.better,
            "than": list(self.than),
            "description": self.describe(),
        }

    def values(self, arms: dict[str, dict[str, Any]], arm: str) -> list[float]:
        try:
            return [float(x) for x in arms[arm]["per_seed"][self.rule.metric]]
        except KeyError as e:
            raise ValueError(
                f"no per-seed {self.rule.metric!r} for arm {arm!r}: cannot score the claim"
            ) from e

    def verdicts(self, arms: dict[str, dict[str, Any]]) -> list[Verdict]:
        a = self.values(arms, self.better)
        if len(self.than) == 1:
            return [decide(self.rule, a, self.values(arms, self.than[0]), self.better, self.than[0])]
        pairs = [(self.better, t, a, self.values(arms, t)) for t in self.than]
        return decide_all(self.rule, pairs)

    def score(self, arms: dict[str, dict[str, Any]], note: str = "") -> Scored:
        """The verdict on the stored per-seed numbers. A non-finite number (a diverged run) or a
        missing metric gives ``inconclusive`` with the reason instead of an error."""
        try:
            vs = self.verdicts(arms)
        except ValueError as e:
            return Scored("inconclusive", f"cannot score: {e}", {}, self.to_json())
        verdict = combine([v.verdict for v in vs])
        reason = "; ".join(v.sentence for v in vs)
        if len(vs) > 1:
            reason += f" → {verdict} (every comparison must be supported)"
        detail = (
            vs[0].to_json()
            if len(vs) == 1
            else {"comparisons": [v.to_json() for v in vs], "verdict": verdict}
        )
        if note:
            reason += f" ({note})"
            detail = {**detail, "note": note}
        return Scored(verdict, reason, detail, self.to_json())

    def with_metric(self, metric: str, unit: str | None = None) -> ArmClaim:
        """The same claim on another stored metric (e.g. raw NMI of a page written before the correction)."""
        rule = replace(self.rule, metric=metric, unit=self.rule.unit if unit is None else unit)
        return replace(self, rule=rule)


@dataclass(frozen=True)
class ThresholdClaim:
    """"Arm ``arm``'s per-seed ``rule.metric`` lies beyond ``threshold``" (above it when
    ``rule.lower_is_better`` is False): a claim about one measured quantity against a number fixed
    before the run (e.g. "more than half of the final routing is learned by a quarter of training").

    Scored like an :class:`ArmClaim` whose reference arm holds ``threshold`` in every seed: the t
    interval and test on the per-seed ``value − threshold``, the same decision table."""

    rule: Rule
    arm: str
    threshold: float
    threshold_name: str = ""  # how the page names the threshold (default: the number)

    @property
    def reference(self) -> str:
        return self.threshold_name or f"{self.threshold:g}"

    def describe(self) -> str:
        return f"{self.arm} vs {self.reference}: {self.rule.describe().replace(' (Holm)', '')}"

    def to_json(self) -> dict[str, Any]:
        return {
            **self.rule.to_json(),
            "better": self.arm,
            "than": [self.reference],
            "threshold": self.threshold,
            "description": self.describe(),
        }

    def score(self, arms: dict[str, dict[str, Any]], claim: str = "") -> Scored:
        """The verdict on the stored per-seed numbers (inconclusive, with the reason, when missing)."""
        try:
            values = [float(x) for x in arms[self.arm]["per_seed"][self.rule.metric]]
            v = decide(self.rule, values, [self.threshold] * len(values), self.arm, self.reference)
        except KeyError:
            reason = f"cannot score: no per-seed {self.rule.metric!r} for arm {self.arm!r}"
            return Scored("inconclusive", reason, {}, self.to_json(), claim=claim)
        except ValueError as e:  # a non-finite value: no number to compare
            return Scored("inconclusive", f"cannot score: {e}", {}, self.to_json(), claim=claim)
        return Scored(v.verdict, v.sentence, v.to_json(), self.to_json(), claim=claim)


def comparisons(detail: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``Verdict.to_json()`` entries behind a verdict detail (none for a study's own statistic)."""
    if "comparisons" in detail:
        return list(detail["comparisons"])
    return [detail] if "comparison" in detail else []


def descriptive_differences(
    arms: dict[str, dict[str, Any]], metric: str, reference: str, skip: Sequence[str] = ()
) -> list[Comparison]:
    """Every other arm minus ``reference`` on ``metric``, paired by seed, for reading only (the
    claim's verdict is not drawn from these). Arms without the metric or with a non-finite value
    are left out."""
    ref = arms.get(reference, {}).get("per_seed", {}).get(metric)
    out = []
    for arm, a in arms.items():
        xs = a.get("per_seed", {}).get(metric)
        if arm == reference or arm in skip or xs is None or ref is None or len(xs) != len(ref):
            continue
        if not all(math.isfinite(x) for x in [*xs, *ref]):
            continue
        out.append(paired_difference(xs, ref, arm, reference, metric, n_boot=2_000))
    return out

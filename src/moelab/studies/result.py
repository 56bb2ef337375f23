"""What a study is and what it returns: the catalog, the registries, :class:`StudyResult` and the
per-arm summaries (mean ± sd over seeds).

Why a module of its own: the runner (:mod:`moelab.studies.base`), the arm trainer
(:mod:`moelab.studies.arms`), the scorer (:mod:`moelab.studies.scoring`) and the page writer
(:mod:`moelab.studies.page`) all speak this vocabulary; none of them needs the others to do so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from moelab.registry import Registry
from moelab.stats import VERDICTS

BUDGETS = ("smoke", "full", "gpu")  # gpu: the full studies at 20× the tokens, on CUDA (moelab.studies.arms)

# The twelve studies of issue 11 and issue 14's encoder-decoder study, one line each; those in STUDIES run.
CATALOG: dict[str, str] = {
    "iso-flop": "MoE (E 4-32, k 2) vs iso-active / iso-total dense: loss vs training FLOPs, compute multiplier",
    "sqrt-rule": "dense ladder fit loss(N); MoE dense-equivalent size vs sqrt(active x total)",
    "routers": "topk, switch, noisy_topk, expert_choice, sigmoid_bias, hash at equal budget",
    "granularity": "fine-grained and shared experts at equal active and total parameters (DeepSeekMoE)",
    "placement": "MoE in every layer, every other layer, all but the first, only the last half",
    "capacity": "capacity factor 0.5/1.0/1.25/2.0 vs dropless: loss and drops (drops towards the end)",
    "data-hunger": "MoE vs dense on unique vs repeated data: does MoE overfit repeated data sooner",
    "swarm": "request-level routing over dense models vs token-level MoE",
    "specialisation": "NMI of expert choice with domain/language/position/token; early routing learning",
    "sparsity": "dense FFN activation sparsity; MoEfication vs MoE from scratch",
    "gradient-conflict": "per-domain gradient cosine in a dense FFN vs within MoE experts",
    "hybrid-inference": "bandwidth argument for MoE on CPU+GPU: calc predictions vs published figures",
    "enc-dec-specialisation": "encoder experts specialise on token identity more than decoder experts (ST-MoE)",
}


@dataclass(frozen=True)
class Scored:
    """A study's verdict computed from its stored numbers by its declared rule.

    ``reason`` is the sentence a reader sees (the difference with its interval, the seeds that went
    the claimed way, p, the verdict); ``detail`` every number behind it (``Verdict.to_json()`` for
    one comparison, the study's own JSON otherwise); ``rule`` the declared rule, JSON-able, with a
    ``description``.
    """

    verdict: str
    reason: str
    detail: dict[str, Any]
    rule: dict[str, Any]
    claim: str = ""  # the claim's sentence, for a further claim (the study's own is StudyResult.claim)
    further: tuple[Scored, ...] = ()  # the study's further claims, each with its own verdict

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if any(not f.claim for f in self.further):
            raise ValueError("a further claim needs its sentence (Scored.claim)")

    def with_claim(self, claim: str) -> Scored:
        """This verdict as a further claim with the sentence ``claim``."""
        return replace(self, claim=claim)

    def claim_json(self) -> dict[str, Any]:
        """A further claim as :attr:`StudyResult.further_claims` stores it."""
        return {
            "claim": self.claim,
            "verdict": self.verdict,
            "verdict_reason": self.reason,
            "verdict_detail": self.detail,
            "rule": self.rule,
        }


@dataclass
class StudyResult:
    """What a study returns: rows of the table, numbers, plots written, and the computed verdict."""

    name: str
    claim: str
    method: str
    budget: str
    seeds: list[int]
    data: str  # which corpus was used
    arms: dict[str, dict[str, Any]]  # arm → {"per_seed": {metric: [..]}, "mean": {..}, "std": {..}, ...}
    verdict: str
    verdict_reason: str  # the verdict's sentence, with its interval
    numbers: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    command: str = ""
    wall_s: float | None = None  # set by run_study: how long the whole study took
    threads: int | None = None  # torch threads per run
    jobs: int | None = None  # runs trained side by side (``--jobs``)
    verdict_detail: dict[str, Any] = field(default_factory=dict)  # every number behind the verdict
    rule: dict[str, Any] = field(default_factory=dict)  # the declared rule the verdict was computed by
    rescored: dict[str, Any] | None = None  # {"date", "previous_verdict", "previous_reason"} after --rescore
    # A study that tests more than one claim: each further claim with its own rule and verdict
    # (:meth:`Scored.claim_json`); the fields above hold the first (headline) claim.
    further_claims: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def scored(cls, scored: Scored, **fields_: Any) -> StudyResult:
        """A result whose verdict fields come from ``scored`` (the other fields as keywords)."""
        return cls(
            verdict=scored.verdict,
            verdict_reason=scored.reason,
            verdict_detail=scored.detail,
            rule=scored.rule,
            further_claims=[f.claim_json() for f in scored.further],
            **fields_,
        )

    def apply(self, scored: Scored) -> StudyResult:
        """Set the verdict fields from ``scored`` (in place; returns self)."""
        self.verdict, self.verdict_reason = scored.verdict, scored.reason
        self.verdict_detail, self.rule = scored.detail, scored.rule
        self.further_claims = [f.claim_json() for f in scored.further]
        return self

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StudyResult:
        """A result from its JSON (a page written before a field existed gets the field's default)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


STUDIES: Registry[Callable[..., StudyResult]] = Registry("study")
# name → score(arms, numbers) -> Scored: the verdict from stored numbers alone (``--rescore``)
SCORES: Registry[Callable[[dict[str, Any], dict[str, Any]], Scored]] = Registry("study score")


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample sd; NaN for both when a value is not finite (a diverged run, a statistic with no
    estimate): the page shows n/a rather than a number that hides the gap."""
    if not all(math.isfinite(x) for x in xs):
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def arm_summary(per_seed: dict[str, list[float]]) -> dict[str, Any]:
    """One arm of a study: ``{"per_seed": {metric: [..]}, "mean": {metric: ..}, "std": {metric: ..}}``."""
    return {
        "per_seed": per_seed,
        "mean": {k: mean_std(v)[0] for k, v in per_seed.items()},
        "std": {k: mean_std(v)[1] for k, v in per_seed.items()},
    }

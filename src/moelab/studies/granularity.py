"""Study ``granularity``: DeepSeekMoE's fine-grained and shared experts.

Claim (seed note 004, DeepSeekMoE): splitting experts finer (E·g experts of hidden F/g, top k·g)
and isolating one shared expert lowers loss at equal active and total parameters.
A shared arm keeps both equal by making one fine expert always-on: E·g−1 routed, top k·g−1.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.config import MoEConfig
from moelab.stats import Rule
from moelab.studies.base import (
    SCORES,
    STUDIES,
    ArmClaim,
    Scored,
    StudyResult,
    base_run,
    data_label,
    train_arms,
)

# The claim, declared before any run. Minimum effect 0.01 nats/token (1% in perplexity): a smaller loss
# gap is no reason to split experts finer.
CLAIM = ArmClaim(
    Rule("val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05, paired=True),
    "E32k8+shared",
    ("E8k2",),
)

FULL_STEPS = 150  # at --budget full: every arm and seed fit in minutes on 2 CPU cores

GRAINS = ((8, 2, 1), (16, 4, 2), (32, 8, 4))  # (E, k, g)


@SCORES.register("granularity")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    return CLAIM.score(arms)


@STUDIES.register("granularity")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    moe = base.model.moe or MoEConfig()
    F = max(16, moe.expert_hidden - moe.expert_hidden % 4)  # coarse expert hidden, divisible by every g
    arms = {}
    for E, k, g in GRAINS:
        h = F // g
        arms[f"E{E}k{k}"] = replace(
            base.model, moe=replace(moe, num_experts=E, top_k=k, expert_hidden=h, num_shared_experts=0)
        )
        arms[f"E{E}k{k}+shared"] = replace(
            base.model,
            moe=replace(
                moe, num_experts=E - 1, top_k=k - 1, expert_hidden=h, num_shared_experts=1, shared_hidden=h
            ),
        )
    res = train_arms(base, arms, seeds, out, jobs=jobs)
    return StudyResult.scored(
        score(res, {}),
        name="granularity",
        claim="fine-grained experts with a shared expert (E32,k8 + 1 shared) beat E8,k2 at equal active and total",
        method=f"coarse expert hidden {F}; fine grain g splits it into F/g; shared arms replace one routed fine expert",
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=res,
    )

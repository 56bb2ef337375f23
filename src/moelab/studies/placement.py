"""Study ``placement``: which layers hold MoE.

Claim (seed note 004; GShard/Switch use every other layer, DeepSeek keeps the first dense): MoE in
every layer reaches a lower validation loss than MoE in every other layer at the same steps.
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
# gap is no reason to choose where MoE layers go.
CLAIM = ArmClaim(
    Rule("val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05, paired=True), "all", ("every_other",)
)

# At --budget full. 200 steps (v1) put the arms' gap (0.016) below the seed noise (sd up to 0.16) and
# before the point where the MoE passes its dense twin (≈600 steps, README's compare run); 600 steps
# with 5 seeds (the effect is under 0.05 nats) fit in ≈30 min on 2 cores with --jobs 2.
FULL_STEPS = 600


@SCORES.register("placement")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    return CLAIM.score(arms)


@STUDIES.register("placement")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    moe = base.model.moe or MoEConfig()
    L = base.model.n_layers
    arms = {
        "all": replace(base.model, moe=replace(moe, placement="all")),
        "every_other": replace(base.model, moe=replace(moe, placement="every_n", every_n=2)),
        "first_dense": replace(base.model, moe=replace(moe, placement="first_k_dense", first_k_dense=1)),
        "last_half": replace(
            base.model, moe=replace(moe, placement="explicit", layers=tuple(range(L // 2, L)))
        ),
    }
    res = train_arms(base, arms, seeds, out, jobs=jobs)
    return StudyResult.scored(
        score(res, {}),
        name="placement",
        claim="MoE in every layer reaches lower validation loss than MoE in every other layer",
        method=f"{L}-layer model; MoE layers placed four ways, dense FFN elsewhere; same data, steps and seeds",
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=res,
    )

"""Study ``capacity``: capacity factor 0.5, 1.0, 1.25, 2.0 against dropless.

Claim (seed note 004, Switch/GShard): a capacity limit drops tokens and costs loss; dropless is
at least as good as any capacity factor. Verdict: dropless vs capacity 1.0 on validation loss.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moelab.config import MoEConfig
from moelab.studies.base import STUDIES, StudyResult, arm_comparison, base_run, train_arms

FACTORS = (0.5, 1.0, 1.25, 2.0)


@STUDIES.register("capacity")
def run(budget: str, seeds: list[int], out: Path) -> StudyResult:
    base = base_run(budget)
    moe = base.model.moe or MoEConfig()
    arms = {f"cf{f:g}": replace(base.model, moe=replace(moe, capacity_factor=f)) for f in FACTORS}
    arms["dropless"] = replace(base.model, moe=replace(moe, capacity_factor=None))
    res = train_arms(base, arms, seeds, out)
    return arm_comparison(
        "capacity",
        claim="dropless routing reaches lower validation loss than capacity factor 1.0",
        method="one MoE per capacity factor (position drop policy) and a dropless one; same data, steps, seeds",
        budget=budget,
        seeds=seeds,
        base=base,
        arms=res,
        better="dropless",
        than="cf1",
    )

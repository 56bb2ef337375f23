"""Study ``capacity``: capacity factor 0.5, 1.0, 1.25, 2.0 against dropless.

Claim (seed note 004, Switch/GShard): a capacity limit drops tokens and costs loss; dropless is
at least as good as any capacity factor. Verdict: dropless vs capacity 1.0 on validation loss.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moelab.config import MoEConfig
from moelab.studies.base import STUDIES, StudyResult, base_run, data_label, train_arms, verdict

FACTORS = (0.5, 1.0, 1.25, 2.0)


@STUDIES.register("capacity")
def run(budget: str, seeds: list[int], out: Path) -> StudyResult:
    base = base_run(budget)
    moe = base.model.moe or MoEConfig()
    arms = {f"cf{f:g}": replace(base.model, moe=replace(moe, capacity_factor=f)) for f in FACTORS}
    arms["dropless"] = replace(base.model, moe=replace(moe, capacity_factor=None))
    res = train_arms(base, arms, seeds, out)
    v, why = verdict(res["dropless"]["per_seed"]["val_loss"], res["cf1"]["per_seed"]["val_loss"])
    return StudyResult(
        name="capacity",
        claim="dropless routing reaches lower validation loss than capacity factor 1.0",
        method="one MoE per capacity factor (position drop policy) and a dropless one; same data, steps, seeds",
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=res,
        verdict=v,
        verdict_reason=why,
    )

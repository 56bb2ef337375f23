"""Study ``granularity``: DeepSeekMoE's fine-grained and shared experts.

Claim (seed note 004, DeepSeekMoE): splitting experts finer (E·g experts of hidden F/g, top k·g)
and isolating one shared expert lowers loss at equal active and total parameters.
A shared arm keeps both equal by making one fine expert always-on: E·g−1 routed, top k·g−1.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moelab.config import MoEConfig
from moelab.studies.base import STUDIES, StudyResult, arm_comparison, base_run, train_arms

FULL_STEPS = 150  # at --budget full: every arm and seed fit in minutes on 2 CPU cores

GRAINS = ((8, 2, 1), (16, 4, 2), (32, 8, 4))  # (E, k, g)


@STUDIES.register("granularity")
def run(budget: str, seeds: list[int], out: Path) -> StudyResult:
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
    res = train_arms(base, arms, seeds, out)
    return arm_comparison(
        "granularity",
        claim="fine-grained experts with a shared expert (E32,k8 + 1 shared) beat E8,k2 at equal active and total",
        method=f"coarse expert hidden {F}; fine grain g splits it into F/g; shared arms replace one routed fine expert",
        budget=budget,
        seeds=seeds,
        base=base,
        arms=res,
        better="E32k8+shared",
        than="E8k2",
    )

"""Study ``granularity``: DeepSeekMoE's fine-grained and shared experts.

Claim (seed note 004, DeepSeekMoE): splitting experts finer (E·g experts of hidden F/g, top k·g)
and isolating one shared expert lowers loss at equal active and total parameters. A shared arm
keeps both equal by making one fine expert always-on: E·g−1 routed, top k·g−1.

Arms: ``E8k2`` (the coarse MoE), ``E32k8`` (g = 4) and ``E32k8+shared`` (31 routed, top 7, one
shared fine expert). Three claims, each with its own verdict, all declared here before any run:

1. :data:`CLAIM`: fine-grained + shared beats coarse (DeepSeekMoE's combined claim);
2. :data:`FINE`: fine-grained alone beats coarse;
3. :data:`SHARED`: the shared expert helps at equal granularity.

Every arm runs at its own best learning rate (:func:`moelab.studies.arms.tune_lr`: the preset's
rate × 0.5, 1, 2 on a tuning seed no verdict uses): finer experts may want another rate, and one
rate for all would favour whichever arm it suits.

Full budget: ``FULL_STEPS`` = 1,000 steps; 3 arms × 3 rates on the tuning seed, then 3 arms × the
verdict's seeds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.config import ModelConfig, MoEConfig
from moelab.experiment.run import prepare
from moelab.stats import Rule
from moelab.studies.arms import tune_lr
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

# The claims, declared before any run. Minimum effect 0.01 nats/token (1% in perplexity): a smaller loss
# gap is no reason to split experts finer or to add a shared one.
LOSS = Rule("val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05, paired=True)
CLAIM = ArmClaim(LOSS, "E32k8+shared", ("E8k2",))
FINE = ArmClaim(LOSS, "E32k8", ("E8k2",))
SHARED = ArmClaim(LOSS, "E32k8+shared", ("E32k8",))
FINE_TEXT = "fine-grained experts alone (E32,k8) beat E8,k2 at equal active and total parameters"
SHARED_TEXT = "a shared expert (E32,k8 + 1 shared) beats fine-grained routed experts alone (E32,k8) at equal parameters"

FULL_STEPS = 1000  # at --budget full: well past the MoE–dense crossover (≈600 steps)
COARSE = (8, 2)  # (E, k) of the coarse MoE
FINE_GRAIN = 4  # g: each coarse expert split into g fine ones


@SCORES.register("granularity")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    """:data:`CLAIM`, with :data:`FINE` and :data:`SHARED` as further claims when their arms ran."""
    main = CLAIM.score(arms)
    further = tuple(
        claim.score(arms).with_claim(text)
        for claim, text in ((FINE, FINE_TEXT), (SHARED, SHARED_TEXT))
        if claim.better in arms and all(t in arms for t in claim.than)
    )
    return replace(main, further=further)


def granularity_arms(model: ModelConfig) -> dict[str, ModelConfig]:
    """Coarse, fine and fine + shared MoEs with the same active and total expert parameters."""
    moe = model.moe or MoEConfig()
    F = max(16, moe.expert_hidden - moe.expert_hidden % FINE_GRAIN)  # coarse expert hidden, divisible by g
    E, k = COARSE
    g = FINE_GRAIN
    h = F // g
    coarse = replace(moe, num_experts=E, top_k=k, expert_hidden=F, num_shared_experts=0)
    fine = replace(moe, num_experts=E * g, top_k=k * g, expert_hidden=h, num_shared_experts=0)
    shared = replace(fine, num_experts=E * g - 1, top_k=k * g - 1, num_shared_experts=1, shared_hidden=h)
    return {
        f"E{E}k{k}": replace(model, moe=coarse),
        f"E{E * g}k{k * g}": replace(model, moe=fine),
        f"E{E * g}k{k * g}+shared": replace(model, moe=shared),
    }


@STUDIES.register("granularity")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base, data = prepare(base_run(budget, FULL_STEPS))
    arms, tuning = tune_lr(base, granularity_arms(base.model), out / "lr-grid", jobs=jobs, data=data)
    res = train_arms(base, arms, seeds, out, jobs=jobs, data=data)
    moe = base.model.moe or MoEConfig()
    return StudyResult.scored(
        score(res, {}),
        name="granularity",
        claim="fine-grained experts with a shared expert (E32,k8 + 1 shared) beat E8,k2 at equal active and total",
        method=(
            f"coarse experts of hidden {moe.expert_hidden} (E8, k2); fine grain g={FINE_GRAIN} splits each into "
            f"{FINE_GRAIN} of hidden {moe.expert_hidden // FINE_GRAIN} (E32, k8); the shared arm makes one fine expert "
            "always-on (31 routed, k7, 1 shared); each arm at its best learning rate of the grid (table) on a tuning "
            "seed, then every verdict seed at that rate; same data and steps"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=res,
        numbers={"lr_tuning": tuning},
    )

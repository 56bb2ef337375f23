"""Study ``gradient-conflict``: do MoE experts see less gradient conflict between domains than a dense FFN?

Claim (seed note 000): in a dense model every token's gradient lands on the same FFN weights,
so domains pull them in different directions ("conflicting gradients"); an expert is updated
only by the tokens routed to it, so its gradients from different domains agree more.

Method: per seed, train the run's MoE and its iso-active dense twin on the same data, order and
steps; then, on held-out blocks, the language-modelling gradient of each domain's tokens on each
FFN layer's weights (``moelab.analysis.gradient_conflict``) and the cosine between every pair of
domains. Dense: the mean off-diagonal cosine of the layer's whole FFN. MoE: the same cosine
inside each expert (over the experts both domains reach), and over the whole layer (all experts'
weights as one vector). Means over layers per seed. Verdict (:data:`CLAIM`): MoE per-expert cosine
vs dense cosine (higher = more agreement = less conflict), paired over seeds (both models of seed
s train on seed s's data order and are probed on the same blocks), t interval and test.

Budgets: ``smoke`` 8 steps of the smoke preset; ``full`` 400 steps of ``tiny`` on
../shared/corpus (7 domains) — two models per seed, ≈ 4 minutes per seed, ≈ 12 for 3 seeds.

Legend: D domains.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis.gradient_conflict import gradient_conflict
from moelab.experiment.run import TrainedRun
from moelab.model.twins import dense_twin
from moelab.stats import Rule
from moelab.studies import plots
from moelab.studies.base import (
    SCORES,
    STUDIES,
    ArmClaim,
    Scored,
    StudyResult,
    arm_summary,
    base_run,
    data_label,
    train_outcomes,
)

FULL_STEPS = 400
EVAL_BATCHES = 8
ARMS = ("dense FFN", "MoE experts", "MoE whole layer")

# The claim, declared before any run. Minimum effect 0.02 in cosine (1% of its range [-1, 1]): a smaller
# change in how well domain gradients agree is no sign that experts resolve the conflict.
CLAIM = ArmClaim(
    Rule("cosine", lower_is_better=False, min_effect=0.02, alpha=0.05, paired=True, unit="cosine"),
    "MoE experts",
    ("dense FFN",),
)


def _plot(per_seed: list[dict], path: Path) -> None:
    fig, ax = plots.subplots(figsize=(6, 3.6))
    for arm in ARMS:
        arr = np.array([s[arm] for s in per_seed])  # [seeds, layers]
        ax.errorbar(np.arange(arr.shape[1]), arr.mean(0), yerr=arr.std(0), marker="o", capsize=3, label=arm)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("FFN layer")
    ax.set_ylabel("mean cosine between domain gradients")
    ax.set_title("Gradient agreement between domains (mean ± std over seeds)")
    ax.legend()
    plots.save(fig, path)


def domain_cosines(run: TrainedRun) -> dict[str, Any]:
    """The probe: the domains and the mean off-diagonal cosine per FFN layer (for an MoE also
    inside each expert), on the run's held-out blocks."""
    names = run.data.splits.val.label_names.get("domain")
    g = gradient_conflict(run.model, run.trainer.val_batches[:EVAL_BATCHES], "domain", names)
    entries = [g["layers"][k] for k in sorted(g["layers"], key=int)]
    if run.cfg.model.moe is None:
        return {"domains": g["values"], "dense FFN": [e["mean_offdiag"] for e in entries]}
    return {
        "domains": g["values"],
        "MoE whole layer": [e["mean_offdiag"] for e in entries],
        "MoE experts": [e.get("per_expert_mean_offdiag", 0.0) for e in entries],
    }


@SCORES.register("gradient-conflict")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    return CLAIM.score(arms)


@STUDIES.register("gradient-conflict")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    models = {"moe": base.model, "dense": dense_twin(base.model, "iso_active")}
    outcomes = train_outcomes(base, models, seeds, out, probe=domain_cosines, jobs=jobs)
    per_seed = []
    for i, seed in enumerate(seeds):
        moe, dense = outcomes["moe"][i].probe, outcomes["dense"][i].probe
        per_seed.append({"seed": seed, "domains": dense["domains"], "MoE whole layer": moe["MoE whole layer"],
                         "MoE experts": moe["MoE experts"], "dense FFN": dense["dense FFN"]})
    arms = {arm: arm_summary({"cosine": [statistics.fmean(s[arm]) for s in per_seed]}) for arm in ARMS}
    plot = out / "gradient-conflict.png"
    _plot(per_seed, plot)
    return StudyResult.scored(
        score(arms, {}),
        name="gradient-conflict",
        claim="MoE experts see less gradient conflict between domains than a dense FFN (higher cosine)",
        method=(
            f"per seed an MoE and its iso-active dense twin, {base.train.steps} steps on the same data; on held-out blocks the "
            "cosine between per-domain LM gradients on each FFN layer (dense: whole FFN; MoE: inside each expert, "
            "and over the whole layer), mean over domain pairs and layers"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=arms,
        numbers={"per_seed": per_seed, "steps": base.train.steps},
        plots=[str(plot)],
    )

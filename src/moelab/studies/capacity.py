"""Study ``capacity``: capacity factor 0.5, 1.0, 1.25, 2.0 with the ``position`` and ``score``
drop policies, against dropless.

Claims (seed note 004, Switch/GShard, OpenMoE): a capacity limit drops tokens and costs loss, so
dropless is at least as good as any capacity factor; and with the ``position`` policy (earliest
assignments win) the drops fall towards the end of the sequence ("drops towards the end").
Verdict: dropless vs capacity 1.0 (position policy) on validation loss, paired over seeds
(:data:`CLAIM`).

Capacity scope: every arm counts capacity per sequence (``moe.capacity_scope=sequence``: each
expert takes at most ``ceil(cf · K · S / E)`` of a sequence's assignments, transformers' Switch
"groups"), in training and in the drop probe alike, so the loss and the drops measure the same
limit and "the end" is the end of a sequence. (Until 2026-12-06 the arms trained with capacity
counted over the whole flattened batch while drops were measured per sequence.)

Each model is also measured on held-out blocks, one sequence per forward pass (as in OpenMoE;
``moelab.analysis.drops``): drop rate overall and in the first and last quarter of the sequence,
averaged over MoE layers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.analysis.drops import drop_rate_by_position, quarter_rates
from moelab.config import ModelConfig, MoEConfig, RunConfig
from moelab.experiment.run import TrainedRun
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

FULL_STEPS = 300  # at --budget full: 9 arms × 3 seeds ≈ 25 min with --jobs 2
SCOPE = "sequence"  # where capacity is counted, in training and in the drop probe

# The claim, declared before any run. Minimum effect 0.01 nats/token (1% in perplexity): a smaller loss
# gap is no reason to choose a capacity policy.
CLAIM = ArmClaim(Rule("val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05, paired=True), "dropless", ("cf1",))

FACTORS = (0.5, 1.0, 1.25, 2.0)
POLICIES = ("position", "score")
DROP_BATCHES = 4


@torch.no_grad()
def drops_by_position(run: TrainedRun) -> dict[str, float]:
    """Drop rate overall, in the first and in the last quarter of each sequence (mean over layers)."""
    model = run.model
    model.eval()
    S = run.cfg.data.seq_len
    positions: dict[int, list[np.ndarray]] = {}
    kept: dict[int, list[np.ndarray]] = {}
    for b in run.trainer.val_batches[:DROP_BATCHES]:
        for row in b.input_ids.split(1):
            for layer, d in (model(row, return_routing=True).routing or {}).items():
                positions.setdefault(layer, []).append(d.token.cpu().numpy())
                kept.setdefault(layer, []).append(d.kept.cpu().numpy())
    if not positions:
        return {}
    overall, first, last = [], [], []
    for layer in positions:
        k = np.concatenate(kept[layer])
        curve = drop_rate_by_position(np.concatenate(positions[layer]), k, S)
        f, la = quarter_rates(curve)
        overall.append(float((~k.astype(bool)).mean()))
        first.append(f)
        last.append(la)
    return {
        "drop_rate": float(np.mean(overall)),
        "drop_first_quarter": float(np.mean(first)),
        "drop_last_quarter": float(np.mean(last)),
    }


@SCORES.register("capacity")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    return CLAIM.score(arms)


def capacity_arms(base: RunConfig) -> dict[str, ModelConfig]:
    """The study's models: one per capacity factor and drop policy (``cf1`` = 1.0, position), and a
    dropless one, every one with capacity counted per sequence (:data:`SCOPE`)."""
    moe = replace(base.model.moe or MoEConfig(), capacity_scope=SCOPE)
    arms = {}
    for policy in POLICIES:
        suffix = "" if policy == "position" else f"-{policy}"
        for f in FACTORS:
            arms[f"cf{f:g}{suffix}"] = replace(base.model, moe=replace(moe, capacity_factor=f, drop_policy=policy))
    arms["dropless"] = replace(base.model, moe=replace(moe, capacity_factor=None))
    return arms


@STUDIES.register("capacity")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    res = train_arms(base, capacity_arms(base), seeds, out, probe=drops_by_position, jobs=jobs)
    return StudyResult.scored(
        score(res, {}),
        name="capacity",
        claim="dropless routing reaches lower validation loss than capacity factor 1.0",
        method=(
            "one MoE per capacity factor and drop policy (position: earliest assignments win; score: highest "
            f"router weight wins) and a dropless one, capacity counted per {SCOPE} in training and in the probe "
            "(moe.capacity_scope); same data, steps, seeds; drop rates on held-out sequences (overall, first and last "
            "quarter)"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=res,
    )

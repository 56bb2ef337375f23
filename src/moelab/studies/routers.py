"""Study ``routers``: every registered router family at equal budget.

Claim (seed note 004, DeepSeek-V3): aux-loss-free balancing (``sigmoid_bias``) reaches a lower
validation loss than softmax top-k with a balance loss. Every router also reports its training
tokens/s and, on held-out batches after training, its load balance: the coefficient of variation
of the experts' loads (std / mean, 0 = balanced), the dead experts (under a tenth of the uniform
share) and the drop rate, each a mean over MoE layers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moelab.config import MoEConfig, RouterConfig
from moelab.experiment.run import TrainedRun
from moelab.moe.stats import RoutingStats
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

FULL_STEPS = 150  # at --budget full: every arm and seed fit in minutes on 2 CPU cores
HEALTH_BATCHES = 8  # held-out batches the load statistics are measured on
DEAD_SHARE = 0.1  # an expert is dead below this fraction of the uniform share 1/E

# The claim, declared before any run. Minimum effect 0.01 nats/token (1% in perplexity): a smaller loss
# gap is no reason to choose a router.
CLAIM = ArmClaim(Rule("val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05, paired=True), "sigmoid_bias", ("topk",))


def _arms(model):
    moe = model.moe or MoEConfig()
    E = moe.num_experts

    def with_router(k: int | None = None, **router):
        return replace(
            model, moe=replace(moe, top_k=k or moe.top_k, router=replace(RouterConfig(), **router))
        )

    arms = {
        "topk": with_router(name="topk"),
        "switch": with_router(k=1, name="switch"),
        "noisy_topk": with_router(name="noisy_topk"),
        "expert_choice": with_router(name="expert_choice"),
        "sigmoid_bias": with_router(name="sigmoid_bias"),
        "hash": with_router(name="hash"),
    }
    if E % 2 == 0:
        arms["sigmoid_bias_groups"] = with_router(name="sigmoid_bias", n_group=2, topk_group=1)
    return arms


def _speed(run: TrainedRun) -> dict[str, float]:
    train = [r for r in run.records if r.get("kind") == "train"]
    return {"tokens_per_s": float(train[-1].get("tokens_per_s", 0.0))} if train else {}


@torch.no_grad()
def held_out_routing(run: TrainedRun) -> dict[str, float]:
    """Load CV, dead experts per layer and drop rate on held-out batches (means over MoE layers)."""
    model, trainer = run.model, run.trainer
    model.eval()
    stats = RoutingStats({})
    for b in trainer.val_batches[:HEALTH_BATCHES]:
        stats = stats + RoutingStats.from_routing(model(b.input_ids.to(trainer.device), return_routing=True).routing)
    layers = list(stats.layers.values())
    if not layers:
        return {}
    cv, dead = [], []
    for s in layers:
        load = s.load.double()
        cv.append(float(load.std(unbiased=False) / load.mean().clamp_min(1e-12)))
        dead.append(float((s.load_fraction < DEAD_SHARE / load.numel()).sum()))
    n = len(layers)
    return {"load_cv": sum(cv) / n, "dead_experts": sum(dead) / n, "drop_rate": sum(s.drop_rate for s in layers) / n}


def router_metrics(run: TrainedRun) -> dict[str, float]:
    """The probe: training tokens/s and the held-out routing health."""
    return {**_speed(run), **held_out_routing(run)}


@SCORES.register("routers")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    return CLAIM.score(arms)


@STUDIES.register("routers")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    res = train_arms(base, _arms(base.model), seeds, out, probe=router_metrics, jobs=jobs)
    return StudyResult.scored(
        score(res, {}),
        name="routers",
        claim="aux-loss-free sigmoid_bias routing reaches lower validation loss than top-k with a balance loss",
        method=(
            "one MoE per router (switch at k=1, the rest at the base k); same data, steps and seeds; load CV, "
            f"dead experts (< {DEAD_SHARE:g}/E of the assignments) and drop rate on {HEALTH_BATCHES} held-out "
            "batches after training, means over MoE layers; tokens/s of the last training steps"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=res,
    )

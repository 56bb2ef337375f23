"""Study ``routers``: every registered router family at equal budget.

Claim (seed note 004, DeepSeek-V3): aux-loss-free balancing (``sigmoid_bias``) reaches a lower
validation loss than softmax top-k with a balance loss. Every router also reports tokens/s.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moelab.config import MoEConfig, RouterConfig
from moelab.studies.base import STUDIES, StudyResult, arm_comparison, base_run, train_arms

FULL_STEPS = 150  # at --budget full: every arm and seed fit in minutes on 2 CPU cores


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


def _speed(trainer) -> dict[str, float]:
    from moelab.train.logging import read_metrics

    train = [r for r in read_metrics(trainer.run_dir) if r.get("kind") == "train"]
    return {"tokens_per_s": float(train[-1].get("tokens_per_s", 0.0))} if train else {}


@STUDIES.register("routers")
def run(budget: str, seeds: list[int], out: Path) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    res = train_arms(base, _arms(base.model), seeds, out, extra=_speed)
    return arm_comparison(
        "routers",
        claim="aux-loss-free sigmoid_bias routing reaches lower validation loss than top-k with a balance loss",
        method="one MoE per router (switch at k=1, the rest at the base k); same data, steps and seeds",
        budget=budget,
        seeds=seeds,
        base=base,
        arms=res,
        better="sigmoid_bias",
        than="topk",
    )

"""Study ``routers``: every registered router family at equal budget.

Claim (seed note 004, DeepSeek-V3; Wang et al. 2024): aux-loss-free balancing (``sigmoid_bias``
with its bias updates and *no* balance loss) reaches a lower validation loss than softmax top-k
with a balance loss. The arms that do not learn their balance from a loss (``sigmoid_bias``,
``hash``) train with ``moe.aux_loss=none``; the rest keep the preset's 0.01 load-balance loss.

That comparison changes two things at once, the gate (sigmoid vs softmax) and the balancing (bias
vs loss); the paper's own comparison keeps the sigmoid gate and changes only the balancing. So a
second claim (:data:`SAME_GATE`, declared 2026-12-06 after the first run, before its arm had run):
``sigmoid_bias`` vs ``sigmoid_aux`` — the same sigmoid router with the bias frozen
(``bias_update_rate=0``) and the load-balance loss on the sigmoid scores instead.

Budget: 1,000 steps. The bias moves by ``bias_update_rate`` (γ = 0.001) a step, so the ≈300 updates
it needs to move a logit by O(0.3) are a third of the run (at 150 steps it had not balanced yet).

Every router also reports, on held-out batches after training, its load balance as the paper
reports it: MaxVio = (max load − mean load) / mean load, over all the held-out batches together
(``max_vio_global``) and per batch (``max_vio_batch``, the mean over batches), beside the coefficient
of variation of the loads (std / mean), the dead experts (under a tenth of the uniform share) and the
drop rate, each a mean over MoE layers; and its training tokens/s.
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

FULL_STEPS = 1000  # at --budget full: past the ≈300 steps bias balancing needs; 8 arms × 3 seeds ≈ 1.3 h with --jobs 2
HEALTH_BATCHES = 8  # held-out batches the load statistics are measured on
DEAD_SHARE = 0.1  # an expert is dead below this fraction of the uniform share 1/E
LOSS_FREE = "none"  # moe.aux_loss of the arms that balance without a loss (bias updates; a fixed hash)

# The claim, declared before any run. Minimum effect 0.01 nats/token (1% in perplexity): a smaller loss
# gap is no reason to choose a router.
CLAIM = ArmClaim(Rule("val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05, paired=True), "sigmoid_bias", ("topk",))
# The second claim: the same gate, balanced by bias updates vs by the loss (the paper's comparison).
SAME_GATE = ArmClaim(CLAIM.rule, "sigmoid_bias", ("sigmoid_aux",))
SAME_GATE_TEXT = (
    "with the same sigmoid gate, balancing by bias updates (no balance loss) reaches lower validation loss than "
    "balancing by the load-balance loss (Wang et al. 2024's comparison)"
)


def _arms(model):
    moe = model.moe or MoEConfig()
    E = moe.num_experts

    def with_router(name: str, k: int | None = None, aux_loss: str | None = None, **options):
        router = RouterConfig(name=name, options=options)
        return replace(
            model,
            moe=replace(moe, top_k=k or moe.top_k, router=router, aux_loss=aux_loss or moe.aux_loss),
        )

    arms = {
        "topk": with_router("topk"),
        "switch": with_router("switch", k=1),
        "noisy_topk": with_router("noisy_topk"),
        "expert_choice": with_router("expert_choice"),
        "sigmoid_bias": with_router("sigmoid_bias", aux_loss=LOSS_FREE),
        "sigmoid_aux": with_router("sigmoid_bias", bias_update_rate=0.0),  # the bias stays 0: the loss balances
        "hash": with_router("hash", aux_loss=LOSS_FREE),
    }
    if E % 2 == 0:
        arms["sigmoid_bias_groups"] = with_router("sigmoid_bias", aux_loss=LOSS_FREE, n_group=2, topk_group=1)
    return arms


def _speed(run: TrainedRun) -> dict[str, float]:
    train = [r for r in run.records if r.get("kind") == "train"]
    return {"tokens_per_s": float(train[-1].get("tokens_per_s", 0.0))} if train else {}


@torch.no_grad()
def held_out_routing(run: TrainedRun) -> dict[str, float]:
    """MaxVio (all batches together and per batch), load CV, dead experts and drop rate on held-out
    batches, each a mean over MoE layers."""
    model, trainer = run.model, run.trainer
    model.eval()
    stats = RoutingStats({})
    batch_vio: list[float] = []
    for b in trainer.val_batches[:HEALTH_BATCHES]:
        one = RoutingStats.from_routing(model(b.input_ids.to(trainer.device), return_routing=True).routing)
        if one.layers:
            batch_vio.append(sum(s.max_violation for s in one.layers.values()) / len(one.layers))
        stats = stats + one
    layers = list(stats.layers.values())
    if not layers:
        return {}
    cv, dead = [], []
    for s in layers:
        load = s.load.double()
        cv.append(float(load.std(unbiased=False) / load.mean().clamp_min(1e-12)))
        dead.append(float((s.load_fraction < DEAD_SHARE / load.numel()).sum()))
    n = len(layers)
    return {
        "max_vio_global": sum(s.max_violation for s in layers) / n,
        "max_vio_batch": sum(batch_vio) / len(batch_vio),
        "load_cv": sum(cv) / n,
        "dead_experts": sum(dead) / n,
        "drop_rate": sum(s.drop_rate for s in layers) / n,
    }


def router_metrics(run: TrainedRun) -> dict[str, float]:
    """The probe: training tokens/s and the held-out routing health."""
    return {**_speed(run), **held_out_routing(run)}


@SCORES.register("routers")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    """:data:`CLAIM`, and :data:`SAME_GATE` as a further claim when its arm was run."""
    main = CLAIM.score(arms)
    if "sigmoid_aux" not in arms:  # a page written before the same-gate arm
        return main
    return replace(main, further=(SAME_GATE.score(arms).with_claim(SAME_GATE_TEXT),))


@STUDIES.register("routers")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    res = train_arms(base, _arms(base.model), seeds, out, probe=router_metrics, jobs=jobs)
    return StudyResult.scored(
        score(res, {}),
        name="routers",
        claim=(
            "aux-loss-free sigmoid_bias routing (bias updates, no balance loss) reaches lower validation loss "
            "than top-k with a balance loss"
        ),
        method=(
            "one MoE per router (switch at k=1, the rest at the base k); same data, steps and seeds; "
            f"moe.aux_loss={LOSS_FREE} for sigmoid_bias, sigmoid_bias_groups and hash, the preset's load-balance "
            "loss for the rest (sigmoid_aux: the sigmoid router with its bias frozen at 0, balanced by that loss); MaxVio = (max load − mean load) / mean load over all held-out batches (global) "
            f"and per batch (Wang et al. 2024), load CV, dead experts (< {DEAD_SHARE:g}/E of the assignments) and "
            f"drop rate on {HEALTH_BATCHES} held-out batches after training, means over MoE layers; tokens/s of the "
            "last training steps"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=res,
    )

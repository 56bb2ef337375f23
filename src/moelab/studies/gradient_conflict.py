"""Study ``gradient-conflict``: do MoE experts see less gradient conflict between domains than a dense FFN?

Claim (seed note 000): in a dense model every token's gradient lands on the same FFN weights,
so domains pull them in different directions ("conflicting gradients"); an expert is updated
only by the tokens routed to it, so its gradients from different domains agree more.

Method: per seed, train the run's MoE and its iso-active dense twin on the same data, order and
steps; then, on held-out blocks, the language-modelling gradient of each domain's tokens on each
FFN layer's weights (``moelab.analysis.gradient_conflict``) and the cosine between every pair of
domains. Dense: the mean off-diagonal cosine of the layer's whole FFN. MoE: the same cosine
inside each expert (over the experts both domains reach), and over the whole layer (all experts'
weights as one vector). Means over layers per seed. Verdict: MoE per-expert cosine vs dense
cosine (higher = more agreement = less conflict), :func:`moelab.studies.base.verdict`.

Budgets: ``smoke`` 8 steps of the smoke preset; ``full`` 400 steps of ``tiny`` on
../shared/corpus (7 domains) — two models per seed, ≈ 4 minutes per seed, ≈ 12 for 3 seeds.

Legend: D domains.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from moelab.analysis.gradient_conflict import gradient_conflict
from moelab.model.twins import dense_twin
from moelab.studies import plots
from moelab.studies.base import STUDIES, StudyResult, arm_comparison, arm_summary, base_run, train_arms
from moelab.train.trainer import Trainer

FULL_STEPS = 400
EVAL_BATCHES = 8
ARMS = ("dense FFN", "MoE experts", "MoE whole layer")


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


@STUDIES.register("gradient-conflict")
def run(budget: str, seeds: list[int], out: Path) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    layers: dict[int, dict[str, list[float]]] = {}  # seed → arm → cosine per layer
    domains: list[str] = []

    def probe(trainer: Trainer) -> dict[str, float]:
        names = trainer.data.splits.val.label_names.get("domain")
        g = gradient_conflict(trainer.model, trainer.val_batches[:EVAL_BATCHES], "domain", names)
        domains[:] = g["values"]
        entries = [g["layers"][k] for k in sorted(g["layers"], key=int)]
        seed = layers.setdefault(trainer.cfg.train.seed, {})
        if trainer.cfg.model.moe is None:
            seed["dense FFN"] = [e["mean_offdiag"] for e in entries]
        else:
            seed["MoE whole layer"] = [e["mean_offdiag"] for e in entries]
            seed["MoE experts"] = [e.get("per_expert_mean_offdiag", 0.0) for e in entries]
        return {}

    train_arms(base, {"moe": base.model, "dense": dense_twin(base.model, "iso_active")}, seeds, out, extra=probe)
    per_seed = [{"seed": seed, "domains": domains, **layers[seed]} for seed in seeds]
    arms = {arm: arm_summary({"cosine": [statistics.fmean(s[arm]) for s in per_seed]}) for arm in ARMS}
    plot = out / "gradient-conflict.png"
    _plot(per_seed, plot)
    return arm_comparison(
        "gradient-conflict",
        claim="MoE experts see less gradient conflict between domains than a dense FFN (higher cosine)",
        method=(
            f"per seed an MoE and its iso-active dense twin, {base.train.steps} steps on the same data; on held-out blocks the "
            "cosine between per-domain LM gradients on each FFN layer (dense: whole FFN; MoE: inside each expert, "
            "and over the whole layer), mean over domain pairs and layers"
        ),
        budget=budget,
        seeds=seeds,
        base=base,
        arms=arms,
        better="MoE experts",
        than="dense FFN",
        metric="cosine",
        lower_is_better=False,
        numbers={"per_seed": per_seed, "steps": base.train.steps},
        plots=[str(plot)],
    )

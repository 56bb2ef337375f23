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
from dataclasses import replace
from pathlib import Path

import numpy as np

from moelab.analysis.gradient_conflict import gradient_conflict
from moelab.data.prepare import prepare_data
from moelab.model.twins import dense_twin
from moelab.studies.base import STUDIES, StudyResult, base_run, data_label, mean_std, verdict
from moelab.train.trainer import Trainer

FULL_STEPS = 400
EVAL_BATCHES = 8
ARMS = ("dense FFN", "MoE experts", "MoE whole layer")


def _plot(per_seed: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm in ARMS:
        arr = np.array([s[arm] for s in per_seed])  # [seeds, layers]
        ax.errorbar(np.arange(arr.shape[1]), arr.mean(0), yerr=arr.std(0), marker="o", capsize=3, label=arm)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("FFN layer")
    ax.set_ylabel("mean cosine between domain gradients")
    ax.set_title("Gradient agreement between domains (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@STUDIES.register("gradient-conflict")
def run(budget: str, seeds: list[int], out: Path) -> StudyResult:
    base = base_run(budget)
    steps = FULL_STEPS if budget == "full" else base.train.steps
    base = replace(base, train=replace(base.train, steps=steps, eval_every=0))
    base, data = prepare_data(base)
    models = {"moe": base.model, "dense": dense_twin(base.model, "iso_active")}
    per_seed = []
    for seed in seeds:
        layers: dict[str, list[float]] = {}
        domains: list[str] = []
        for name, model_cfg in models.items():
            run_cfg = replace(base, name=f"gc-{name}-s{seed}", model=model_cfg, train=replace(base.train, seed=seed))
            trainer = Trainer(run_cfg, out / name / f"seed{seed}", data=data)
            trainer.train()
            names = data.splits.val.label_names.get("domain")
            g = gradient_conflict(trainer.model, trainer.val_batches[:EVAL_BATCHES], "domain", names)
            domains = g["values"]
            entries = [g["layers"][k] for k in sorted(g["layers"], key=int)]
            if name == "dense":
                layers["dense FFN"] = [e["mean_offdiag"] for e in entries]
            else:
                layers["MoE whole layer"] = [e["mean_offdiag"] for e in entries]
                layers["MoE experts"] = [e.get("per_expert_mean_offdiag", 0.0) for e in entries]
        per_seed.append({"seed": seed, "domains": domains, **layers})
    arms = {}
    for arm in ARMS:
        means = [statistics.fmean(s[arm]) for s in per_seed]
        arms[arm] = {"per_seed": {"cosine": means}, "mean": {"cosine": mean_std(means)[0]}, "std": {"cosine": mean_std(means)[1]}}
    v, why = verdict(arms["MoE experts"]["per_seed"]["cosine"], arms["dense FFN"]["per_seed"]["cosine"], lower_is_better=False)
    plot = out / "gradient-conflict.png"
    _plot(per_seed, plot)
    return StudyResult(
        name="gradient-conflict",
        claim="MoE experts see less gradient conflict between domains than a dense FFN (higher cosine)",
        method=(
            f"per seed an MoE and its iso-active dense twin, {steps} steps on the same data; on held-out blocks the "
            "cosine between per-domain LM gradients on each FFN layer (dense: whole FFN; MoE: inside each expert, "
            "and over the whole layer), mean over domain pairs and layers"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=arms,
        verdict=v,
        verdict_reason=why,
        numbers={"per_seed": per_seed, "steps": steps},
        plots=[str(plot)],
    )

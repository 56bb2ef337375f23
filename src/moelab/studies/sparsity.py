"""Study ``sparsity``: activation sparsity of dense FFNs during training, and MoEfication.

Claim (seed note 000: dense FFNs activate sparsely, so they can be split into experts; the
MoEfication line of work): an MoE trained from scratch reaches a lower loss than a MoEfied dense
model at the same active size (k = 1 of the preset's E experts: 1/8 at the full budget).

Arms (same prepared data, data order, steps and seeds):
- ``dense``: FFN hidden F = E·expert_hidden of the preset's MoE. Trained in four stages of one
  :class:`Trainer` (``stop_at``; the same run as an uninterrupted one); after each stage the
  fraction of active neurons per layer (``analysis.sparsity.ffn_sparsity``, |h| > 0.1·max) is
  measured on validation batches (``numbers.sparsity``, plotted).
- ``moefied_kK``: the trained dense model MoEfied (``convert.moefy``: clustered neurons, learned
  router) into E experts of F/E neurons, evaluated at k = 1, 2, E (k/E = 1/4, 1/2, 1 for E = 4).
- ``scratch_kK``: an MoE with the same E experts of F/E neurons (same total and active FFN size)
  trained from scratch at k = 1 and 2.
Every loss is ``convert.moefy.lm_loss`` on the same validation batches.

Verdict (:data:`CLAIM`): ``scratch_k1`` vs ``moefied_k1`` held-out loss, paired over seeds (the
scratch MoE and the dense model MoEfied for seed s share seed s's data order and the validation
batches), t interval and test, minimum effect 0.01 nats/token.

Full budget: tiny preset, 3 trainings per seed (dense, 2 scratch MoEs) × 3 seeds at
``FULL_STEPS`` steps, plus MoEfication (seconds): 17 minutes on one thread beside another study.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moelab.config import MoEConfig
from moelab.experiment.run import TrainedRun
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
    train_arms,
)

FULL_STEPS = 200  # at --budget full: every arm and seed fit in minutes on 2 CPU cores

# The claim, declared before any run. Minimum effect 0.01 nats/token (1% in perplexity): a smaller loss
# gap is no reason to train an MoE from scratch rather than MoEfy a dense model.
CLAIM = ArmClaim(
    Rule("val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05, paired=True),
    "scratch_k1",
    ("moefied_k1",),
)

STAGES = 4
MAIN_TAU = 0.1


def _plot(sparsity: dict[str, list[dict[str, Any]]], path: Path) -> None:
    fig, ax = plots.subplots(figsize=(7, 4.5))
    first = next(iter(sparsity.values()))
    for layer in first[0]["layers"]:
        steps = [p["step"] for p in first]
        fr = [
            sum(s[i]["layers"][layer] for s in sparsity.values()) / len(sparsity) for i in range(len(first))
        ]
        ax.plot(steps, fr, marker=".", label=f"layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"active neuron fraction (|h| > {MAIN_TAU:g}·max), mean over seeds")
    ax.legend(fontsize=7)
    plots.save(fig, path, dpi=100)


def held_out_lm_loss(run: TrainedRun) -> dict[str, float]:
    """The probe of the scratch MoEs: ``convert.moefy.lm_loss`` on the run's validation batches
    (the batches every arm of the study is scored on)."""
    from moelab.convert.moefy import lm_loss

    with torch.no_grad():
        return {"lm_loss": lm_loss(run.model.eval(), [b.input_ids for b in run.trainer.val_batches])}


@SCORES.register("sparsity")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    return CLAIM.score(arms)


@STUDIES.register("sparsity")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    from moelab.analysis.sparsity import ffn_sparsity
    from moelab.convert.moefy import lm_loss, moefy, with_top_k
    from moelab.data.loader import eval_batches
    from moelab.experiment.run import finished_run, prepare, train_run

    base = base_run(budget, FULL_STEPS)
    moe0 = base.model.moe or MoEConfig()
    E, h = moe0.num_experts, moe0.expert_hidden
    ks = sorted({1, 2, E})
    base, data = prepare(base)
    vocab = data.tokenizer.vocab_size
    dense_cfg = replace(base.model, moe=None, ffn_hidden=E * h, vocab_size=vocab)
    val = eval_batches(data.splits.val, base.train.batch_size, base.train.eval_batches)
    val_ids = [b.input_ids for b in val]
    calib = [data.splits.train.batch(list(range(i * 4, i * 4 + 4))).input_ids for i in range(4)]
    steps = base.train.steps
    stops = sorted({max(1, steps * (i + 1) // STAGES) for i in range(STAGES)})

    per: dict[str, dict[str, list[float]]] = {"dense": {}} | {f"moefied_k{k}": {} for k in ks}
    sparsity: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        cfg = replace(base, name=f"dense-s{seed}", model=dense_cfg, train=replace(base.train, seed=seed))
        points = []
        for i, stop in enumerate(
            stops
        ):  # one trainer carried through the stages: the same run as an uninterrupted one
            if i == 0:
                dense_run = train_run(cfg, out / "dense" / f"seed{seed}", data=data, stop_at=stop)
            else:
                trainer = dense_run.trainer
                dense_run = finished_run(trainer, trainer.train(stop_at=stop), dense_run.wall_s)
            sp = ffn_sparsity(dense_run.model, val, main=MAIN_TAU)
            points.append(
                {
                    "step": stop,
                    "layers": {k: v["active_fraction"][f"{MAIN_TAU:g}"] for k, v in sp["layers"].items()},
                }
            )
        sparsity[f"seed{seed}"] = points
        model = dense_run.model.eval()
        with torch.no_grad():
            dense_loss = lm_loss(model, val_ids)
        per["dense"].setdefault("val_loss", []).append(dense_loss)
        per["dense"].setdefault("active_fraction", []).append(
            sum(points[-1]["layers"].values()) / len(points[-1]["layers"])
        )
        moe_model = moefy(model, calib, E, max(ks), seed=seed)
        for k in ks:
            with torch.no_grad():
                loss = lm_loss(with_top_k(moe_model, k), val_ids)
            per[f"moefied_k{k}"].setdefault("val_loss", []).append(loss)
            per[f"moefied_k{k}"].setdefault("k_over_E", []).append(k / E)
    arms = {name: arm_summary(ps) for name, ps in per.items()}

    scratch = {f"scratch_k{k}": replace(base.model, moe=replace(moe0, top_k=k)) for k in (1, 2)}
    res = train_arms(base, scratch, seeds, out, probe=held_out_lm_loss, jobs=jobs, data=data)
    for arm, a in res.items():
        # Same loss function and batches as the dense / MoEfied arms.
        a["per_seed"]["trainer_val_loss"] = a["per_seed"]["val_loss"]
        a["per_seed"]["val_loss"] = a["per_seed"].pop("lm_loss")
        a["per_seed"]["k_over_E"] = [int(arm[-1]) / E] * len(seeds)
        arms[arm] = arm_summary(a["per_seed"])
    plot = out / "sparsity.png"
    _plot(sparsity, plot)
    return StudyResult.scored(
        score(arms, {}),
        name="sparsity",
        claim=f"an MoE trained from scratch beats a MoEfied dense model at equal active size (k/E = 1/{E})",
        method=(
            f"dense FFN {E * h} trained {steps} steps (sparsity measured at steps {stops}); MoEfied into "
            f"{E} experts of {h} (clustered split, learned router) at k={ks}; MoE from scratch E={E}, "
            f"expert_hidden={h}, k=1 and 2; loss = lm_loss on the same validation batches"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=arms,
        numbers={"sparsity": sparsity, "main_threshold": MAIN_TAU},
        plots=[str(plot)],
    )

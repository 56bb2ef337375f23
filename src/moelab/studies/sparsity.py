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

Verdict (framework ``verdict``): supported when ``scratch_k1`` beats ``moefied_k1`` by more than
2× the pooled seed std, not supported when the reverse holds, else inconclusive.

Full budget: tiny preset, 3 trainings per seed (dense, 2 scratch MoEs) × 3 seeds at
``FULL_STEPS`` steps, plus MoEfication (seconds): 17 minutes on one thread beside another study.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moelab.config import MoEConfig
from moelab.studies import plots
from moelab.studies.base import STUDIES, StudyResult, arm_summary, base_run, data_label, train_arms, verdict

FULL_STEPS = 200  # at --budget full: every arm and seed fit in minutes on 2 CPU cores

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


@STUDIES.register("sparsity")
def run(budget: str, seeds: list[int], out: Path) -> StudyResult:
    from moelab.analysis.sparsity import ffn_sparsity
    from moelab.convert.moefy import lm_loss, moefy, with_top_k
    from moelab.data.loader import eval_batches
    from moelab.data.prepare import prepare_data
    from moelab.train.trainer import Trainer

    base = base_run(budget, FULL_STEPS)
    moe0 = base.model.moe or MoEConfig()
    E, h = moe0.num_experts, moe0.expert_hidden
    ks = sorted({1, 2, E})
    base, data = prepare_data(base)
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
        run = replace(base, name=f"dense-s{seed}", model=dense_cfg, train=replace(base.train, seed=seed))
        trainer = Trainer(run, out / "dense" / f"seed{seed}", data=data)
        points = []
        for stop in stops:
            trainer.train(stop_at=stop)
            sp = ffn_sparsity(trainer.model, val, main=MAIN_TAU)
            points.append(
                {
                    "step": stop,
                    "layers": {k: v["active_fraction"][f"{MAIN_TAU:g}"] for k, v in sp["layers"].items()},
                }
            )
        sparsity[f"seed{seed}"] = points
        model = trainer.model.eval()
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

    def extra(trainer) -> dict[str, float]:
        with torch.no_grad():
            return {"lm_loss": lm_loss(trainer.model.eval(), val_ids)}

    scratch = {f"scratch_k{k}": replace(base.model, moe=replace(moe0, top_k=k)) for k in (1, 2)}
    res = train_arms(base, scratch, seeds, out, extra=extra)
    for arm, a in res.items():
        # Same loss function and batches as the dense / MoEfied arms.
        a["per_seed"]["trainer_val_loss"] = a["per_seed"]["val_loss"]
        a["per_seed"]["val_loss"] = a["per_seed"].pop("lm_loss")
        a["per_seed"]["k_over_E"] = [int(arm[-1]) / E] * len(seeds)
        arms[arm] = arm_summary(a["per_seed"])
    v, why = verdict(arms["scratch_k1"]["per_seed"]["val_loss"], arms["moefied_k1"]["per_seed"]["val_loss"])
    plot = out / "sparsity.png"
    _plot(sparsity, plot)
    return StudyResult(
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
        verdict=v,
        verdict_reason="scratch_k1 vs moefied_k1: " + why,
        numbers={"sparsity": sparsity, "main_threshold": MAIN_TAU},
        plots=[str(plot)],
    )

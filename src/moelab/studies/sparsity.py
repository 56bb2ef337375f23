"""Study ``sparsity``: activation sparsity of dense FFNs during training, and MoEfication.

Claim (seed note 000: dense FFNs activate sparsely, so they can be split into experts; the
MoEfication line of work): an MoE trained from scratch reaches a lower loss than a MoEfied dense
model at the same active size (k = 1 of the preset's E experts: 1/8 at the full budget) **and the
same total training compute**. The MoEfied model inherits a dense model whose training cost ≈3.8×
the FLOPs a step of the k = 1 MoE costs, so at equal *steps* the comparison hands MoEfication most of
the compute; here the scratch MoE trains for as many steps as buy the FLOPs of the dense
pre-training and the MoEfied model's fine-tuning together.

Arms (same prepared data, data order and seeds):
- ``dense``: FFN hidden F = E·expert_hidden of the preset's MoE, ``FULL_STEPS`` steps, trained in four
  stages of one :class:`Trainer` (``stop_at``; the same run as an uninterrupted one); after each
  stage the fraction of active neurons per layer (``analysis.sparsity.ffn_sparsity``, |h| > 0.1·max)
  is measured on validation batches (``numbers.sparsity``, plotted).
- ``moefied_kK``: the trained dense model MoEfied (``convert.moefy``: clustered neurons, learned
  router) into E experts of F/E neurons, evaluated without training at k = 1, 2, E.
- ``moefied_ft_k1``: the MoEfied model at k = 1 fine-tuned for ``FINE_TUNE_STEPS`` steps (every weight,
  the preset's balance loss and learning rate), started from the MoEfied weights (``train_run(init=)``).
- ``scratch_k1``: an MoE with the same E experts of F/E neurons trained from scratch at k = 1 for
  ``floor((dense FLOPs + fine-tuning FLOPs) / FLOPs of a scratch step)`` steps (calc's training FLOPs,
  attention included; rounded down: never more compute than the MoEfied arm): equal total training compute. ``scratch_k1_same_steps`` and
  ``scratch_k2_same_steps``: the same MoE for the dense model's steps (the comparison the study made
  before 2026-12-06, kept for reading).
Every loss is ``convert.moefy.lm_loss`` on the same validation batches.

Verdict (:data:`CLAIM`): ``scratch_k1`` vs ``moefied_ft_k1`` held-out loss, paired over seeds (all arms
of seed s share seed s's data order and the validation batches), t interval and test, minimum
effect 0.01 nats/token. Each arm's total training FLOPs are in its row (``train_flops``: for the
MoEfied arms the dense pre-training's, plus the fine-tuning's).

Full budget: tiny preset; per seed the dense model (``FULL_STEPS``), the fine-tuning, and the
scratch MoEs; MoEfication takes seconds.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moelab.config import MoEConfig
from moelab.experiment.run import TrainedRun
from moelab.stats import Rule
from moelab.studies import plots
from moelab.studies.arms import budget_numbers
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

FULL_STEPS = 300  # dense pre-training steps at --budget full
FINE_TUNE_STEPS_SHARE = 1 / 3  # the MoEfied model's fine-tuning, as a share of the dense model's steps

# The claim, declared before any run. Minimum effect 0.01 nats/token (1% in perplexity): a smaller loss
# gap is no reason to train an MoE from scratch rather than MoEfy a dense model.
CLAIM = ArmClaim(
    Rule("val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05, paired=True),
    "scratch_k1",
    ("moefied_ft_k1",),
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


OLD_CLAIM_NOTE = (
    "the committed numbers predate the equal-compute arms: the rule is applied to scratch_k1 vs the MoEfied model "
    "without fine-tuning at equal steps; re-run the study for the equal-compute comparison"
)


@SCORES.register("sparsity")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    """:data:`CLAIM` (the pre-2026-12-06 comparison, said so, on pages without the fine-tuned arm)."""
    if "moefied_ft_k1" not in arms:
        return replace(CLAIM, than=("moefied_k1",)).score(arms, note=OLD_CLAIM_NOTE)
    return CLAIM.score(arms)


def equal_compute_steps(spent_flops: float, flops_per_token: float, tokens_per_step: int) -> int:
    """The most steps of a run costing ``flops_per_token`` that spend no more than ``spent_flops`` (at
    least 1): rounded down, so the claimed arm never gets more compute than the one it is compared with."""
    return max(1, math.floor(spent_flops / (flops_per_token * tokens_per_step) + 1e-9))


def _fine_tune(moefied, base, data, seed: int, steps: int, aux_coef: float, run_dir: Path):
    """The MoEfied model at k = 1 trained ``steps`` more steps from its MoEfied weights (every weight;
    the preset's balance loss weight and learning rate, warm-up a tenth of the steps)."""
    from moelab.convert.moefy import with_top_k
    from moelab.experiment.run import train_run
    from moelab.train.init import InitSource

    model = with_top_k(moefied, 1)
    cfg_model = replace(model.cfg, moe=replace(model.cfg.moe, aux_loss_coef=aux_coef))
    source = InitSource.of_model("moefied", cfg_model, model, data.tokenizer)
    train = replace(base.train, seed=seed, steps=steps, warmup_steps=max(1, steps // 10))
    cfg = replace(base, name=f"moefied_ft_k1-s{seed}", model=cfg_model, train=train)
    return train_run(cfg, run_dir, data=data, init=source)


@STUDIES.register("sparsity")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    from moelab.analysis.sparsity import ffn_sparsity
    from moelab.convert.moefy import lm_loss, moefy, with_top_k
    from moelab.data.loader import eval_batches
    from moelab.experiment.run import finished_run, prepare, train_flops_per_token, train_run
    from moelab.model.transformer import Transformer
    from moelab.model.twins import count_params

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
    ft_steps = max(1, round(steps * FINE_TUNE_STEPS_SHARE))
    tokens_per_step = base.train.batch_size * base.train.grad_accum * base.data.seq_len
    stops = sorted({max(1, steps * (i + 1) // STAGES) for i in range(STAGES)})

    per: dict[str, dict[str, list[float]]] = {"dense": {}} | {f"moefied_k{k}": {} for k in ks} | {"moefied_ft_k1": {}}
    sparsity: dict[str, list[dict[str, Any]]] = {}
    spent: list[float] = []  # per seed: dense pre-training + fine-tuning FLOPs
    for seed in seeds:
        cfg = replace(base, name=f"dense-s{seed}", model=dense_cfg, train=replace(base.train, seed=seed))
        points = []
        for i, stop in enumerate(stops):  # one trainer carried through the stages: the same run as an uninterrupted one
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
        dense_flops = dense_run.train_flops
        with torch.no_grad():
            dense_loss = lm_loss(model, val_ids)
        per["dense"].setdefault("val_loss", []).append(dense_loss)
        for key, value in budget_numbers(dense_run).items():
            per["dense"].setdefault(key, []).append(value)
        per["dense"].setdefault("active_fraction", []).append(
            sum(points[-1]["layers"].values()) / len(points[-1]["layers"])
        )
        moe_model = moefy(model, calib, E, max(ks), seed=seed)
        for k in ks:
            with torch.no_grad():
                loss = lm_loss(with_top_k(moe_model, k), val_ids)
            per[f"moefied_k{k}"].setdefault("val_loss", []).append(loss)
            per[f"moefied_k{k}"].setdefault("k_over_E", []).append(k / E)
            per[f"moefied_k{k}"].setdefault("train_flops", []).append(dense_flops)
        ft = _fine_tune(moe_model, base, data, seed, ft_steps, moe0.aux_loss_coef, out / "moefied_ft_k1" / f"seed{seed}")
        with torch.no_grad():
            ft_loss = lm_loss(ft.model.eval(), val_ids)
        spent.append(dense_flops + ft.train_flops)
        tokens = float(dense_run.tokens + ft.tokens)
        ft_numbers = budget_numbers(ft) | {
            "val_loss": ft_loss, "k_over_E": 1 / E, "train_flops": spent[-1], "steps": float(dense_run.steps + ft.steps),
            "tokens": tokens, "tokens_per_active_param": tokens / max(ft.counts.active, 1),
        }  # fmt: skip
        for key, value in ft_numbers.items():  # its budget: the dense pre-training's and the fine-tuning's
            per["moefied_ft_k1"].setdefault(key, []).append(value)
    arms = {name: arm_summary(ps) for name, ps in per.items()}

    scratch_cfg = {k: replace(base.model, moe=replace(moe0, top_k=k), vocab_size=vocab) for k in (1, 2)}
    scratch_fpt = train_flops_per_token(scratch_cfg[1], count_params(Transformer(scratch_cfg[1])).active, base.data.seq_len)
    eq_steps = equal_compute_steps(min(spent), scratch_fpt, tokens_per_step)  # the seeds spend the same FLOPs
    equal = replace(base, model=scratch_cfg[1], train=replace(base.train, steps=eq_steps, warmup_steps=min(50, eq_steps // 4)))
    scratch = {
        "scratch_k1": equal,
        "scratch_k1_same_steps": scratch_cfg[1],
        "scratch_k2_same_steps": scratch_cfg[2],
    }
    res = train_arms(base, scratch, seeds, out, probe=held_out_lm_loss, jobs=jobs, data=data)
    for arm, a in res.items():
        # Same loss function and batches as the dense / MoEfied arms.
        a["per_seed"]["trainer_val_loss"] = a["per_seed"]["val_loss"]
        a["per_seed"]["val_loss"] = a["per_seed"].pop("lm_loss")
        a["per_seed"]["k_over_E"] = [(2 if "k2" in arm else 1) / E] * len(seeds)
        arms[arm] = arm_summary(a["per_seed"])
    plot = out / "sparsity.png"
    _plot(sparsity, plot)
    return StudyResult.scored(
        score(arms, {}),
        name="sparsity",
        claim=(
            f"at equal total training FLOPs, an MoE trained from scratch beats a dense model MoEfied and fine-tuned "
            f"(k/E = 1/{E})"
        ),
        method=(
            f"dense FFN {E * h} trained {steps} steps (sparsity measured at steps {stops}); MoEfied into {E} experts of "
            f"{h} (clustered split, learned router) and evaluated at k={ks}; the k=1 MoEfied model fine-tuned "
            f"{ft_steps} steps; MoE from scratch E={E}, expert_hidden={h}, k=1 for {eq_steps} steps (the FLOPs of the "
            "dense pre-training plus the fine-tuning, calc's training FLOPs) and, for reading, k=1 and k=2 for the "
            f"dense model's {steps} steps; loss = lm_loss on the same validation batches"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=arms,
        numbers={
            "sparsity": sparsity,
            "main_threshold": MAIN_TAU,
            "equal_compute_steps": eq_steps,
            "fine_tune_steps": ft_steps,
        },
        plots=[str(plot)],
    )

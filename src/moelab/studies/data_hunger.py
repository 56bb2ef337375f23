"""Study ``data-hunger``: does MoE overfit repeated data sooner than its iso-active dense twin?

Claim (seed note 004): with the same data repeated many epochs, an MoE's train/validation gap
grows more than the dense's; here: the MoE's gap at 16× repetition exceeds the dense's.

The iso-active twin has a fraction of the MoE's parameters (3.4× fewer in the ``tiny`` preset), so
a larger MoE gap may only say "more parameters memorise more". A second claim with its own verdict
(:data:`CLAIM_TOTAL`) asks it against the iso-total twin (a dense FFN as wide as all experts
together): does the MoE overfit more than a dense model of *equal total* parameters?

Arms: MoE (the preset's), its iso-active and its iso-total dense twins, each on unique data
(``data.train_fraction`` = 1) and on an evenly spaced fraction of the training blocks (every domain keeps its share) that the run's
token budget reads 4× and 16× (``fraction = steps·batch·seq_len ÷ (epochs · training tokens)``),
at the same token budget, data order rule and seeds.
Gap = validation loss − mean training loss of the logged steps since the previous evaluation,
at every evaluation (curves in ``numbers.curves``, plotted); the per-seed metric ``gap`` is the final one.
Measured epochs (tokens seen ÷ tokens in the subset) are recorded per arm.

Verdicts (a larger gap is the claim): the paired per-seed difference MoE gap − dense gap at ×16
(same seed: same data order and validation batches), t interval and test, minimum effect 0.05
nats/token: against the iso-active twin (:data:`CLAIM`) and the iso-total twin (:data:`CLAIM_TOTAL`).

Full budget: tiny preset, 9 arms × 3 seeds at ``FULL_STEPS`` steps.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.config import RunConfig
from moelab.experiment.run import TrainedRun, prepare
from moelab.model.twins import dense_twin
from moelab.stats import Rule
from moelab.studies import plots
from moelab.studies.base import (
    SCORES,
    STUDIES,
    ArmClaim,
    Scored,
    StudyResult,
    base_run,
    data_label,
    summarise,
    train_outcomes,
)

FULL_STEPS = 400  # at --budget full: 9 arms × 3 seeds ≈ 40 min with --jobs 2

# The claim, declared before any run. Minimum effect 0.05 nats/token: a gap is a difference of two
# losses, each averaged over few steps, and overfitting worth the name opens gaps of tenths of a nat;
# a difference of gaps below 0.05 says nothing about which model overfits sooner.
CLAIM = ArmClaim(
    Rule("gap", lower_is_better=False, min_effect=0.05, alpha=0.05, paired=True), "moe_x16", ("dense_x16",)
)

# The second claim, declared with the first: the same rule against the twin of equal total parameters.
CLAIM_TOTAL = ArmClaim(CLAIM.rule, "moe_x16", ("dense_total_x16",))
CLAIM_TOTAL_TEXT = (
    "with data repeated 16x, the MoE's train/validation gap exceeds that of a dense model of equal total parameters"
)

EPOCHS = {"unique": None, "x4": 4, "x16": 16}  # None: every training block (no repetition)
TWINS = {"dense": "iso_active", "dense_total": "iso_total"}  # arm prefix → dense_twin kind


def repeat_fractions(base: RunConfig, train_blocks: int) -> dict[str, float]:
    """``data.train_fraction`` per arm so that the run's tokens read the subset ``EPOCHS`` times."""
    budget = base.train.steps * base.train.batch_size
    return {
        tag: 1.0 if epochs is None else min(1.0, max(1, round(budget / epochs)) / train_blocks)
        for tag, epochs in EPOCHS.items()
    }


def gap_curve(metrics: Path) -> list[dict[str, float]]:
    """(step, train loss since last eval, val loss, gap) at each eval record of ``metrics.jsonl``."""
    return gap_curve_of(json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines())


def gap_curve_of(records: Iterable[dict[str, Any]]) -> list[dict[str, float]]:
    """:func:`gap_curve` of a run's logged records (``TrainedRun.records``, metrics.jsonl in memory)."""
    out: list[dict[str, float]] = []
    train: list[float] = []
    for rec in records:
        if rec.get("kind") == "eval":
            tl = sum(train) / len(train) if train else float("nan")
            out.append(
                {"step": rec["step"], "train": tl, "val": rec["val_loss"], "gap": rec["val_loss"] - tl}
            )
            train = []
        elif "loss" in rec and rec.get("kind", "train") == "train":
            train.append(float(rec["loss"]))
    return out


def gap_probe(run: TrainedRun) -> dict[str, Any]:
    """The probe: the final gap, the measured epochs over the arm's subset, and the gap curve."""
    c = gap_curve_of(run.records)
    n = run.trainer.train_split.num_blocks
    return {"gap": c[-1]["gap"], "epochs": run.tokens / (n * run.cfg.data.seq_len), "curve": c}


@SCORES.register("data-hunger")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    """:data:`CLAIM`, and :data:`CLAIM_TOTAL` as a further claim when the iso-total arms were run."""
    main = CLAIM.score(arms)
    if "dense_total_x16" not in arms:  # a page written before the iso-total twin
        return main
    return replace(main, further=(CLAIM_TOTAL.score(arms).with_claim(CLAIM_TOTAL_TEXT),))


def _plot(curves: dict[str, list[list[dict[str, float]]]], path: Path) -> None:
    fig, ax = plots.subplots(figsize=(7.5, 4.8))
    for n_arm, (arm, per_seed) in enumerate(curves.items()):
        n = min(len(c) for c in per_seed)
        steps = [per_seed[0][i]["step"] for i in range(n)]
        gaps = [sum(c[i]["gap"] for c in per_seed) / len(per_seed) for i in range(n)]
        style = ":" if arm.startswith("dense_total") else "--" if arm.startswith("dense") else "-"
        color = f"C{n_arm}"
        ax.plot(steps, gaps, marker=".", label=arm, linestyle=style, color=color)
        for c in per_seed:  # every seed, faint
            ax.plot(steps, [c[i]["gap"] for i in range(n)], linestyle=style, color=color, alpha=0.25, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("validation − train loss (mean over seeds; faint: each seed)")
    ax.legend(fontsize=7)
    plots.save(fig, path, dpi=100)


@STUDIES.register("data-hunger")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    base = replace(base, train=replace(base.train, eval_every=max(1, base.train.steps // 4), log_every=1))
    base, data = prepare(base)  # train_fraction picks blocks at training time: one corpus serves every arm
    fractions = repeat_fractions(base, data.splits.train.num_blocks)
    models = {"moe": base.model} | {prefix: dense_twin(base.model, kind) for prefix, kind in TWINS.items()}
    arms = {
        f"{kind}_{tag}": replace(base, model=cfg, data=replace(base.data, train_fraction=frac))
        for tag, frac in fractions.items()
        for kind, cfg in models.items()
    }
    outcomes = train_outcomes(base, arms, seeds, out, probe=gap_probe, jobs=jobs, data=data)
    res = summarise(outcomes, by_label=base.name != "smoke")
    curves = {arm: [o.probe["curve"] for o in runs] for arm, runs in outcomes.items()}
    plot = out / "data-hunger.png"
    _plot(curves, plot)
    return StudyResult.scored(
        score(res, {}),
        name="data-hunger",
        claim="with data repeated 16x, the MoE's train/validation gap exceeds its iso-active dense twin's",
        method=(
            "MoE, its iso-active and its iso-total dense twins on unique data and on an evenly spaced fraction of the training blocks "
            f"that the budget reads 4x and 16x (data.train_fraction {fractions}), {base.train.steps} steps each; gap = val loss - train loss "
            f"at every eval ({base.train.eval_every} steps)"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=res,
        numbers={"curves": curves, "fractions": fractions, "target_epochs": EPOCHS},
        plots=[str(plot)],
    )

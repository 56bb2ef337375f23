"""Study ``data-hunger``: does MoE overfit repeated data sooner than its iso-active dense twin?

Claim (seed note 004): with the same data repeated many epochs, an MoE's train/validation gap
grows more than the dense's; here: the MoE's gap at 16× repetition exceeds the dense's.

Arms: MoE (the preset's) and its iso-active dense twin, each on unique data
(``data.train_fraction`` = 1) and on an evenly spaced fraction of the training blocks (every domain keeps its share) that the run's
token budget reads 4× and 16× (``fraction = steps·batch·seq_len ÷ (epochs · training tokens)``),
at the same token budget, data order rule and seeds.
Gap = validation loss − mean training loss of the logged steps since the previous evaluation,
at every evaluation (curves in ``numbers.curves``, plotted); the per-seed metric ``gap`` is the final one.
Measured epochs (tokens seen ÷ tokens in the subset) are recorded per arm.

Verdict (framework ``verdict``, higher gap = the claim): supported when the MoE's final gap at
1/16 exceeds the dense's by more than 2× the pooled seed std, not supported when the dense's
exceeds the MoE's by that margin, else inconclusive.

Full budget: tiny preset, 6 arms × 3 seeds at ``FULL_STEPS`` steps.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.config import RunConfig
from moelab.model.twins import dense_twin
from moelab.studies import plots
from moelab.studies.base import STUDIES, StudyResult, base_run, data_label, train_arms, verdict

FULL_STEPS = 160  # at --budget full: every arm and seed fit in minutes on 2 CPU cores

EPOCHS = {"unique": None, "x4": 4, "x16": 16}  # None: every training block (no repetition)


def repeat_fractions(base: RunConfig, train_blocks: int) -> dict[str, float]:
    """``data.train_fraction`` per arm so that the run's tokens read the subset ``EPOCHS`` times."""
    budget = base.train.steps * base.train.batch_size
    return {
        tag: 1.0 if epochs is None else min(1.0, max(1, round(budget / epochs)) / train_blocks)
        for tag, epochs in EPOCHS.items()
    }


def gap_curve(metrics: Path) -> list[dict[str, float]]:
    """(step, train loss since last eval, val loss, gap) at each eval record of ``metrics.jsonl``."""
    out, train = [], []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval":
            tl = sum(train) / len(train) if train else float("nan")
            out.append(
                {"step": rec["step"], "train": tl, "val": rec["val_loss"], "gap": rec["val_loss"] - tl}
            )
            train = []
        elif "loss" in rec and rec.get("kind", "train") == "train":
            train.append(float(rec["loss"]))
    return out


def _plot(curves: dict[str, list[list[dict[str, float]]]], path: Path) -> None:
    fig, ax = plots.subplots(figsize=(7, 4.5))
    for arm, per_seed in curves.items():
        n = min(len(c) for c in per_seed)
        steps = [per_seed[0][i]["step"] for i in range(n)]
        gaps = [sum(c[i]["gap"] for c in per_seed) / len(per_seed) for i in range(n)]
        ax.plot(steps, gaps, marker=".", label=arm, linestyle="--" if arm.startswith("dense") else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("validation − train loss (mean over seeds)")
    ax.legend(fontsize=7)
    plots.save(fig, path, dpi=100)


@STUDIES.register("data-hunger")
def run(budget: str, seeds: list[int], out: Path) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    base = replace(base, train=replace(base.train, eval_every=max(1, base.train.steps // 4), log_every=1))
    from moelab.data.prepare import prepare_data

    fractions = repeat_fractions(base, prepare_data(base)[1].splits.train.num_blocks)
    moe = base.model
    dense = dense_twin(moe, "iso_active")
    res: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[list[dict[str, float]]]] = {}
    for tag, frac in fractions.items():
        b = replace(base, data=replace(base.data, train_fraction=frac))
        for kind, cfg in (("moe", moe), ("dense", dense)):
            arm = f"{kind}_{tag}"
            curves[arm] = []

            def extra(trainer, arm=arm) -> dict[str, float]:
                c = gap_curve(trainer.run_dir / "metrics.jsonl")
                curves[arm].append(c)
                n = trainer.train_split.num_blocks
                return {"gap": c[-1]["gap"], "epochs": trainer.tokens_seen / (n * trainer.cfg.data.seq_len)}

            res.update(train_arms(b, {arm: cfg}, seeds, out, extra=extra))
    v, why = verdict(
        res["moe_x16"]["per_seed"]["gap"], res["dense_x16"]["per_seed"]["gap"], lower_is_better=False
    )
    plot = out / "data-hunger.png"
    _plot(curves, plot)
    return StudyResult(
        name="data-hunger",
        claim="with data repeated 16x, the MoE's train/validation gap exceeds its iso-active dense twin's",
        method=(
            "MoE and iso-active dense twin on unique data and on an evenly spaced fraction of the training blocks "
            f"that the budget reads 4x and 16x (data.train_fraction {fractions}), {base.train.steps} steps each; gap = val loss - train loss "
            f"at every eval ({base.train.eval_every} steps)"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=res,
        verdict=v,
        verdict_reason="MoE gap minus dense gap at x16: " + why,
        numbers={"curves": curves, "fractions": fractions, "target_epochs": EPOCHS},
        plots=[str(plot)],
    )

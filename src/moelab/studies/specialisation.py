"""Study ``specialisation``: the OpenMoE questions on a model trained on the multilingual corpus.

Claims (seed note 004, OpenMoE, Xue et al. 2024): experts do not specialise by domain, somewhat
by language, not by position, but strongly by **token id** — routing follows the token, not its
meaning; and routing is learned **early** and then barely changes.

Method: per seed, train the run's MoE (the ``tiny`` preset on ../shared/corpus at ``full``),
keeping a checkpoint every twentieth of training (the quarter is one). On held-out blocks, take each token's top-1 expert
per layer and, for label = domain, language, position (8 buckets) and token id, the
baseline-corrected NMI (:func:`moelab.analysis.corrected.corrected_nmi`): NMI(expert; label) minus
the mean NMI after shuffling the label (between documents for document-level labels, between
tokens otherwise), with a document-resampling interval; the same for the **step-0 router** (the
run's own initial weights, rebuilt from its config and seed) on the same tokens, and the gain.
Raw NMI is biased upwards, most for token ids, and a random router already routes by token, so the
raw number overstates "specialisation". Early routing learning: the share of tokens whose top-1
expert at each checkpoint (and at step 0) equals the final one (``moelab.analysis.drift``).

Two claims, two verdicts, both rules declared here before any run:

1. :data:`CLAIM`: corrected token-id NMI vs corrected domain NMI, mean over layers per seed, paired
   over seeds (both are measured on the same model and tokens), t interval and test, minimum effect 0.02.
2. :data:`EARLY` ("routing is learned early"), defined as: at a quarter of training the top-1 routing
   has gone more than half of the way from the untrained router to the final routing. Per seed,
   ``progress = (a25 − a0) / (1 − a0)``, where ``a25`` and ``a0`` are the shares of held-out tokens
   (mean over layers) whose top-1 expert at the checkpoint at 25% of the steps, and of the step-0
   router, equals the final one (``a0`` is what agreement with the final routing owes to chance and
   to the untrained router's own token preferences). Supported when the per-seed progress exceeds
   0.5 by at least 0.05, t test on progress − 0.5 (:class:`~moelab.studies.scoring.ThresholdClaim`).

Budgets: ``smoke`` 8 steps of the smoke preset (seconds); ``full`` 400 steps of ``tiny``
(d 128, 4 layers, E=8, k=2) — about 2 minutes per seed on 2 cores, ≈ 7 minutes for 3 seeds.

Legend: N validation tokens, E experts.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis.corrected import corrected_nmi
from moelab.analysis.drift import agreement, drift_from_checkpoints, top1_by_layer
from moelab.analysis.specialization import position_buckets
from moelab.analysis.step0 import initial_model_from_config
from moelab.experiment.run import TrainedRun
from moelab.stats import Rule
from moelab.studies import plots
from moelab.studies.arms import budget_summary
from moelab.studies.base import (
    SCORES,
    STUDIES,
    ArmClaim,
    Scored,
    StudyResult,
    arm_summary,
    base_run,
    data_label,
    train_outcomes,
)
from moelab.studies.scoring import ThresholdClaim

FULL_STEPS = 400
LABELS = ("domain", "lang", "position", "token")
EVAL_BATCHES = 8
N_SHUFFLE = 20  # label permutations of the baseline
N_BOOT = 20  # half-samples of the documents behind each interval

# The claim, declared before any run. Minimum effect 0.02 NMI (2% of its range [0, 1]): a smaller gap
# between two labels' corrected NMI is no difference in what routing follows.
CLAIM = ArmClaim(
    Rule("corrected_nmi", lower_is_better=False, min_effect=0.02, alpha=0.05, paired=True, unit="NMI"),
    "token",
    ("domain",),
)
EARLY_QUARTER = 0.25  # the point of training "early" refers to
# Claim 2, declared before any run. Threshold 0.5: "learned early" means most of the way by a quarter of
# training; minimum effect 0.05 of the way, so a progress of 0.51 ± noise is not called early.
EARLY = ThresholdClaim(
    Rule("progress", lower_is_better=False, min_effect=0.05, alpha=0.05, paired=True, unit="of the way"),
    "learned@25%",
    0.5,
    "half way (0.5)",
)
EARLY_CLAIM = (
    "routing is learned early (OpenMoE): at a quarter of training the top-1 routing has gone more than half of "
    "the way from the untrained router's agreement with the final routing to full agreement"
)
RAW_NOTE = (
    "the committed numbers are raw NMI, measured before the baseline correction: the rule is applied to "
    "them; re-run the study for the corrected statistic and the step-0 router"
)


def _labels(batches: list, seq_len: int) -> dict[str, np.ndarray]:
    """Every label of the flattened validation tokens, in the order the routing sees them."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in LABELS}
    for b in batches:
        B, S = b.input_ids.shape
        out["token"].append(b.input_ids.reshape(-1).numpy())
        out["position"].append(position_buckets(np.tile(np.arange(S), B), seq_len))
        for name in ("domain", "lang"):
            ids = b.label_ids.get(name)
            out[name].append(ids.reshape(-1).numpy() if ids is not None else np.zeros(B * S, dtype=np.int64))
    return {k: np.concatenate(v) for k, v in out.items()}


def routing_specialisation(run: TrainedRun) -> dict[str, Any]:
    """The probe: per label and layer the raw and corrected NMI of the trained router, its interval,
    the step-0 router's corrected NMI and the gain; the drift of top-1 routing over checkpoints."""
    batches = run.trainer.val_batches[:EVAL_BATCHES]
    labels = _labels(batches, run.cfg.data.seq_len)
    docs = np.concatenate([b.doc_ids.reshape(-1).numpy() for b in batches])
    final = top1_by_layer(run.model, batches)
    initial = top1_by_layer(initial_model_from_config(run.cfg), batches)
    layers = sorted(final)
    stats = {k: [corrected_nmi(final[i], labels[k], docs, N_SHUFFLE, N_BOOT, initial_expert_N=initial[i])
                 for i in layers] for k in LABELS}  # fmt: skip
    drift = drift_from_checkpoints([run.run_dir], batches)  # agreement of every checkpoint with the last
    drift_mean = [statistics.fmean(step) for step in zip(*drift["layers"].values())]
    steps = list(drift["steps"])
    if 0 not in steps:  # the untrained router: how much of the final routing it already had
        steps.insert(0, 0)
        drift_mean.insert(0, statistics.fmean(agreement(initial[i], final[i]) for i in layers))
    pick = {
        "nmi": lambda e: e["nmi"], "corrected": lambda e: e["corrected"], "ci_low": lambda e: e["ci_low"],
        "ci_high": lambda e: e["ci_high"], "step0_corrected": lambda e: e["step0"]["corrected"],
        "gain": lambda e: e["gain"],
    }  # fmt: skip
    out: dict[str, Any] = {key: {k: [f(e) for e in stats[k]] for k in LABELS} for key, f in pick.items()}
    return {**out, "drift_steps": steps, "drift_mean": drift_mean}


@SCORES.register("specialisation")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    """:data:`CLAIM` on the stored per-seed corrected NMI (raw NMI, said so, on pages written before),
    and :data:`EARLY` as the further claim."""
    early = EARLY.score(arms, claim=EARLY_CLAIM)
    if CLAIM.rule.metric not in arms.get(CLAIM.better, {}).get("per_seed", {}):
        return replace(CLAIM.with_metric("nmi").score(arms, note=RAW_NOTE), further=(early,))
    return replace(CLAIM.score(arms), further=(early,))


def early_progress(steps: list[int], agreement: list[float], total_steps: int) -> dict[str, float]:
    """``{"agreement", "agreement_step0", "progress"}`` of one seed's drift curve: the agreement with the
    final routing of the first checkpoint at or after a quarter of ``total_steps``, of step 0, and the
    share of the way between them (:data:`EARLY`). NaN when the curve has no such checkpoint."""
    at = dict(zip(steps, agreement))
    a0 = at.get(0, float("nan"))
    a25 = next((a for st, a in zip(steps, agreement) if st >= EARLY_QUARTER * total_steps), float("nan"))
    progress = (a25 - a0) / (1.0 - a0) if a0 < 1.0 else float("nan")
    return {"agreement": a25, "agreement_step0": a0, "progress": progress}


def _plot(per_seed: list[dict], path: Path) -> None:
    fig, (a, b) = plots.subplots(1, 2, figsize=(10, 3.6))
    for n, label in enumerate(LABELS):
        color = f"C{n}"
        arr = np.array([s["corrected"][label] for s in per_seed])  # [seeds, layers]
        a.errorbar(np.arange(arr.shape[1]), arr.mean(0), yerr=arr.std(0), marker="o", capsize=3, color=color, label=label)
        for row in arr:  # every seed's value
            a.scatter(np.arange(arr.shape[1]), row, s=8, color=color, alpha=0.5)
        arr0 = np.array([s["step0_corrected"][label] for s in per_seed])
        a.plot(np.arange(arr0.shape[1]), arr0.mean(0), linestyle="--", color=color, alpha=0.7)
    a.axhline(0.0, color="grey", lw=0.8)
    a.set_xlabel("MoE layer")
    a.set_ylabel("corrected NMI(top-1 expert; label)")
    a.set_title("What routing follows (mean ± std over seeds, points per seed;\ndashed: the step-0 router)", fontsize=9)
    a.legend()
    for s in per_seed:
        b.plot(s["drift_steps"], s["drift_mean"], marker=".", alpha=0.8, label=f"seed {s['seed']}")
    if per_seed and per_seed[0]["drift_steps"]:
        quarter = EARLY_QUARTER * max(per_seed[0]["drift_steps"])
        b.axvline(quarter, color="grey", lw=0.8, linestyle=":", label="a quarter of training")
    b.set_xlabel("training step")
    b.set_ylabel("top-1 agreement with final routing")
    b.set_ylim(0, 1.02)
    b.set_title("Early routing learning (step 0: the untrained router)")
    b.legend()
    plots.save(fig, path)


@STUDIES.register("specialisation")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    steps = base.train.steps
    every = max(1, steps // 20)  # a checkpoint every 5% of training: the quarter is one of them
    base = replace(base, train=replace(base.train, save_every=every, keep_last=steps // every + 1))
    outcomes = train_outcomes(base, {"moe": base.model}, seeds, out, probe=routing_specialisation, jobs=jobs)
    per_seed = [{"seed": seed, **o.probe} for seed, o in zip(seeds, outcomes["moe"])]
    per_label = {
        "corrected_nmi": "corrected", "nmi": "nmi", "step0_corrected_nmi": "step0_corrected", "gain": "gain",
    }  # fmt: skip
    arms = {
        label: arm_summary({m: [statistics.fmean(s[key][label]) for s in per_seed] for m, key in per_label.items()})
        for label in LABELS
    }
    early = [early_progress(s["drift_steps"], s["drift_mean"], steps) for s in per_seed]
    arms[EARLY.arm] = arm_summary({k: [e[k] for e in early] for k in early[0]})
    plot = out / "specialisation.png"
    _plot(per_seed, plot)
    return StudyResult.scored(
        score(arms, {}),
        name="specialisation",
        claim="expert choice follows token identity more than domain (OpenMoE)",
        method=(
            f"per seed one MoE, {steps} steps, checkpoint every {every}; on held-out blocks, per layer, the "
            "baseline-corrected NMI(top-1 expert; domain | language | position bucket | token id) = NMI minus the "
            f"mean of {N_SHUFFLE} label shuffles (document-level labels shuffled between documents, others between "
            "tokens), the same for the step-0 router (the run's initial weights) and the gain; mean over layers in "
            "the table (per-layer values and document-resampling intervals in the JSON); claim 1: corrected token NMI "
            f"vs corrected domain NMI. The '{EARLY.arm}' row: the share of held-out tokens whose top-1 expert at the "
            "checkpoint at a quarter of training (agreement) and of the step-0 router (agreement_step0) equals the "
            "final one, mean over layers, and progress = (agreement − agreement_step0) / (1 − agreement_step0); "
            "claim 2: progress vs 0.5"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=arms,
        numbers={"per_seed": per_seed, "steps": steps, "budget_arms": budget_summary(outcomes), "num_experts": base.model.moe.num_experts if base.model.moe else 0},
        plots=[str(plot)],
    )

"""Study ``specialisation``: the OpenMoE questions on a model trained on the multilingual corpus.

Claims (seed note 004, OpenMoE, Xue et al. 2024): experts do not specialise by domain, somewhat
by language, not by position, but strongly by **token id** — routing follows the token, not its
meaning; and routing is learned **early** and then barely changes.

Method: per seed, train the run's MoE (the ``tiny`` preset on ../shared/corpus at ``full``),
keeping a checkpoint every tenth of training. On held-out blocks, take each token's top-1 expert
per layer and compute NMI(expert; label) for label = domain, language, position (8 buckets) and
token id (``moelab.analysis.specialization.nmi``). Early routing learning: the share of tokens
whose top-1 expert at each checkpoint equals the final one (``moelab.analysis.drift``).
Verdict (the primary claim): token-id NMI vs domain NMI, mean over layers per seed, with
:func:`moelab.studies.base.verdict` (higher is better). The drift curve is reported beside it.

Budgets: ``smoke`` 8 steps of the smoke preset (seconds); ``full`` 400 steps of ``tiny``
(d 128, 4 layers, E=8, k=2) — about 2 minutes per seed on 2 cores, ≈ 7 minutes for 3 seeds.

Legend: N validation tokens, E experts.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np

from moelab.analysis.drift import drift_from_checkpoints, top1_by_layer
from moelab.analysis.specialization import nmi, position_buckets
from moelab.studies import plots
from moelab.studies.base import STUDIES, StudyResult, arm_comparison, arm_summary, base_run, train_arms
from moelab.train.trainer import Trainer

FULL_STEPS = 400
LABELS = ("domain", "lang", "position", "token")
EVAL_BATCHES = 8


def _labels(batches, seq_len: int) -> dict[str, np.ndarray]:
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


def _plot(per_seed: list[dict], path: Path) -> None:
    fig, (a, b) = plots.subplots(1, 2, figsize=(10, 3.6))
    for label in LABELS:
        arr = np.array([s["nmi"][label] for s in per_seed])  # [seeds, layers]
        a.errorbar(np.arange(arr.shape[1]), arr.mean(0), yerr=arr.std(0), marker="o", capsize=3, label=label)
    a.set_xlabel("MoE layer")
    a.set_ylabel("NMI(top-1 expert; label)")
    a.set_title("What routing follows (mean ± std over seeds)")
    a.legend()
    for s in per_seed:
        b.plot(s["drift_steps"], s["drift_mean"], marker=".", alpha=0.8, label=f"seed {s['seed']}")
    b.set_xlabel("training step")
    b.set_ylabel("top-1 agreement with final routing")
    b.set_ylim(0, 1.02)
    b.set_title("Early routing learning")
    b.legend()
    plots.save(fig, path)


@STUDIES.register("specialisation")
def run(budget: str, seeds: list[int], out: Path) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    steps = base.train.steps
    every = max(1, steps // 10)
    base = replace(base, train=replace(base.train, save_every=every, keep_last=steps // every + 1))
    per_seed = []

    def probe(trainer: Trainer) -> dict[str, float]:
        batches = trainer.val_batches[:EVAL_BATCHES]
        labels = _labels(batches, base.data.seq_len)
        final = top1_by_layer(trainer.model, batches)
        nmis = {k: [nmi(final[i], labels[k]) for i in sorted(final)] for k in LABELS}
        drift = drift_from_checkpoints([trainer.run_dir], batches)  # agreement of every checkpoint with the last
        drift_mean = [statistics.fmean(step) for step in zip(*drift["layers"].values())]
        per_seed.append({"seed": trainer.cfg.train.seed, "nmi": nmis, "drift_steps": drift["steps"], "drift_mean": drift_mean})
        return {}

    train_arms(base, {"moe": base.model}, seeds, out, extra=probe)
    arms = {label: arm_summary({"nmi": [statistics.fmean(s["nmi"][label]) for s in per_seed]}) for label in LABELS}
    quarter = [
        next((a for st, a in zip(s["drift_steps"], s["drift_mean"]) if st >= steps // 4), float("nan")) for s in per_seed
    ]
    arms["agreement@25%"] = arm_summary({"agreement": quarter})
    plot = out / "specialisation.png"
    _plot(per_seed, plot)
    return arm_comparison(
        "specialisation",
        claim="expert choice follows token identity more than domain (OpenMoE); routing is learned early",
        method=(
            f"per seed one MoE, {steps} steps, checkpoint every {every}; on held-out blocks NMI(top-1 expert; "
            "domain | language | position bucket | token id) per layer (mean over layers in the table; the "
            "'agreement@25%' row is the share of tokens routed as at the end by the checkpoint at a quarter of "
            "training, with 1/E as chance); verdict: token NMI vs domain NMI"
        ),
        budget=budget,
        seeds=seeds,
        base=base,
        arms=arms,
        better="token",
        than="domain",
        metric="nmi",
        lower_is_better=False,
        numbers={"per_seed": per_seed, "steps": steps, "num_experts": base.model.moe.num_experts if base.model.moe else 0},
        plots=[str(plot)],
    )

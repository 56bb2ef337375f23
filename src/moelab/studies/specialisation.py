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

from moelab.analysis.drift import agreement, checkpoint_series, top1_by_layer
from moelab.analysis.specialization import nmi, position_buckets
from moelab.data.prepare import prepare_data
from moelab.studies.base import STUDIES, StudyResult, base_run, data_label, mean_std, verdict
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@STUDIES.register("specialisation")
def run(budget: str, seeds: list[int], out: Path) -> StudyResult:
    base = base_run(budget)
    steps = FULL_STEPS if budget == "full" else base.train.steps
    every = max(1, steps // 10)
    base = replace(base, train=replace(base.train, steps=steps, save_every=every, keep_last=steps // every + 1, eval_every=0))
    base, data = prepare_data(base)
    per_seed = []
    for seed in seeds:
        run_cfg = replace(base, name=f"specialisation-s{seed}", train=replace(base.train, seed=seed))
        trainer = Trainer(run_cfg, out / f"seed{seed}", data=data)
        trainer.train()
        batches = trainer.val_batches[:EVAL_BATCHES]
        labels = _labels(batches, base.data.seq_len)
        final = top1_by_layer(trainer.model, batches)
        layers = sorted(final)
        nmis = {k: [nmi(final[i], labels[k]) for i in layers] for k in LABELS}
        from moelab.train.checkpoint import load_model

        drift_steps, drift_mean = [], []
        for step, path in checkpoint_series([out / f"seed{seed}"]):
            model, _ = load_model(path)
            top = top1_by_layer(model, batches)
            drift_steps.append(step)
            drift_mean.append(statistics.fmean(agreement(top[i], final[i]) for i in layers))
        per_seed.append({"seed": seed, "nmi": nmis, "drift_steps": drift_steps, "drift_mean": drift_mean})
    arms = {}
    for label in LABELS:
        means = [statistics.fmean(s["nmi"][label]) for s in per_seed]
        arms[label] = {"per_seed": {"nmi": means}, "mean": {"nmi": mean_std(means)[0]}, "std": {"nmi": mean_std(means)[1]}}
    quarter = [
        next((a for st, a in zip(s["drift_steps"], s["drift_mean"]) if st >= steps // 4), float("nan")) for s in per_seed
    ]
    arms["agreement@25%"] = {
        "per_seed": {"agreement": quarter},
        "mean": {"agreement": mean_std(quarter)[0]},
        "std": {"agreement": mean_std(quarter)[1]},
    }
    v, why = verdict(arms["token"]["per_seed"]["nmi"], arms["domain"]["per_seed"]["nmi"], lower_is_better=False)
    plot = out / "specialisation.png"
    _plot(per_seed, plot)
    return StudyResult(
        name="specialisation",
        claim="expert choice follows token identity more than domain (OpenMoE); routing is learned early",
        method=(
            f"per seed one MoE, {steps} steps, checkpoint every {every}; on held-out blocks NMI(top-1 expert; "
            "domain | language | position bucket | token id) per layer (mean over layers in the table; the "
            "'agreement@25%' row is the share of tokens routed as at the end by the checkpoint at a quarter of "
            "training, with 1/E as chance); verdict: token NMI vs domain NMI"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=arms,
        verdict=v,
        verdict_reason=why,
        numbers={"per_seed": per_seed, "steps": steps, "num_experts": base.model.moe.num_experts if base.model.moe else 0},
        plots=[str(plot)],
    )

"""Study ``sqrt-rule``: is an MoE worth a dense model of size sqrt(active × total)?

Claim (seed note 002): an MoE's dense-equivalent size is about sqrt(active · total), i.e.
``N_eq = active^α · total^(1−α)`` with α = 0.5.

Arms: a dense ladder of five FFN widths (1, 2, 4, 8, 16 × the preset's expert_hidden) and MoEs
E = 4, 8, 16 with k = 2, all with the same data order, steps and seeds. N = non-embedding
parameters (``count_params``: total for dense; active and total for MoE). Per seed, the ladder is
fitted as ``L(N) = a·N^(-b) + c`` (:mod:`moelab.studies.powerlaw`), each MoE's final validation
loss is inverted to ``N_eq``, and α is the least-squares slope of ``log(N_eq/total)`` on
``log(active/total)``: one α per seed (that seed's fit and MoEs) and, for reference, one pooled
over every (MoE, seed) point with its standard error. Points whose loss the fitted curve never
reaches (below its floor c) have no N_eq and are counted in the JSON.

Verdict (:data:`RULE`): the 95% t interval of the mean per-seed α against the band 0.5 ± 0.25:
supported inside it, not supported outside it, else inconclusive.

Full budget: tiny preset, 8 arms × 3 seeds at ``FULL_STEPS`` steps (the widest dense arm is the
slowest): 35 minutes on one thread beside another study, ≈ 22 alone on 2 threads.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.config import ModelConfig, MoEConfig
from moelab.studies import plots
from moelab.studies.base import SCORES, STUDIES, Scored, StudyResult, base_run, data_label, train_arms
from moelab.studies.powerlaw import AlphaRule, equivalent_size, fit_alpha, fit_power_law

FULL_STEPS = 150  # at --budget full: every arm and seed fit in minutes on 2 CPU cores

WIDTHS = (1, 2, 4, 8, 16)
EXPERTS = (4, 8, 16)

# The claim, declared before any run: alpha = 0.5 within 0.25, half the distance from 0.5 to the
# alternatives alpha = 0 (an MoE is worth its total size) and alpha = 1 (only its active size): an alpha
# inside the band is nearer the sqrt rule than either.
RULE = AlphaRule(target=0.5, tolerance=0.25, level=0.95)


def _params(cfg: ModelConfig, vocab: int) -> tuple[float, float]:
    from moelab.model.transformer import Transformer
    from moelab.model.twins import count_params

    pc = count_params(Transformer(replace(cfg, vocab_size=vocab)))
    return float(pc.active), float(pc.total)


def _plot(ladder: list[tuple[float, float]], moes: list[tuple[str, float, float]], fit, path: Path) -> None:
    fig, ax = plots.subplots(figsize=(7, 4.5))
    ax.scatter([n for n, _ in ladder], [v for _, v in ladder], label="dense ladder (mean)")
    a, b, c = fit
    lo, hi = min(n for n, _ in ladder) / 2, max(n for n, _ in ladder) * 2
    xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
    ax.plot(xs, [a * x**-b + c for x in xs], label=f"fit a·N^-{b:.2f} + {c:.2f}")
    for name, sq, loss in moes:
        ax.scatter([sq], [loss], marker="x")
        ax.annotate(f"{name} @ sqrt(A·T)", (sq, loss), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    plots.save(fig, path, dpi=100)


def alpha_points(arms: dict[str, Any], params: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per seed: the dense ladder's fit ``(a, b, c)`` and each MoE's ``(active, total, N_eq)``
    (None when its loss lies below the fitted floor). Pure: from the stored per-seed losses and sizes."""
    dense = sorted((a for a in arms if a.startswith("dense_h")), key=lambda a: params[a]["total"])
    moes = [a for a in arms if a not in dense]
    n_seeds = len(arms[dense[0]]["per_seed"]["val_loss"])
    fits, points = [], []
    for i in range(n_seeds):
        fit = fit_power_law(
            [params[d]["total"] for d in dense], [arms[d]["per_seed"]["val_loss"][i] for d in dense]
        )
        fits.append(list(fit))
        points.append({m: (params[m]["active"], params[m]["total"],
                           equivalent_size(*fit, arms[m]["per_seed"]["val_loss"][i])) for m in moes})  # fmt: skip
    return {"dense": dense, "moes": moes, "fits": fits, "points": points}


@SCORES.register("sqrt-rule")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    """:data:`RULE` on one alpha per seed, each from that seed's ladder fit and its MoEs' N_eq."""
    pts = alpha_points(arms, numbers["params"])
    alphas, skipped = [], []
    for i, seed_points in enumerate(pts["points"]):
        found = [(a, t, n) for a, t, n in seed_points.values() if n is not None]
        if len(found) < 2:
            skipped.append(i)
            continue
        alphas.append(fit_alpha(*map(list, zip(*found)))[0])
    verdict, sentence, detail = RULE.decide(alphas)
    if skipped:
        sentence += (
            f"; seeds at index {skipped} had fewer than 2 MoE losses within their fit's range: no alpha"
        )
    rows = [[str(i), f"{a:.4f}"] for i, a in enumerate(alphas)]
    detail["table"] = {"title": "Alpha per seed (least squares through the origin of log(N_eq/T) on log(A/T)):",
                       "columns": ["seed index", "alpha"], "rows": rows}  # fmt: skip
    if "alpha" in numbers:
        detail["pooled_alpha"] = {"alpha": numbers["alpha"], "se": numbers.get("alpha_se")}
    return Scored(verdict, sentence, detail, RULE.to_json())


@STUDIES.register("sqrt-rule")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    moe0 = base.model.moe or MoEConfig()
    h = moe0.expert_hidden
    models = {f"dense_h{w * h}": replace(base.model, moe=None, ffn_hidden=w * h) for w in WIDTHS}
    models.update({f"E{e}": replace(base.model, moe=replace(moe0, num_experts=e, top_k=2)) for e in EXPERTS})
    from moelab.experiment.run import prepare

    base, data = prepare(base)
    res = train_arms(base, models, seeds, out, jobs=jobs, data=data)
    vocab = data.tokenizer.vocab_size
    sizes = {arm: _params(cfg, vocab) for arm, cfg in models.items()}
    params = {arm: {"active": a, "total": t} for arm, (a, t) in sizes.items()}
    pts = alpha_points(res, params)
    pts_a, pts_t, pts_n, missing = [], [], [], 0
    for seed_points in pts["points"]:
        for arm, (act, tot, n_eq) in seed_points.items():
            res[arm]["per_seed"].setdefault("n_eq_found", []).append(float(n_eq is not None))
            if n_eq is None:
                missing += 1
                continue
            pts_a.append(act)
            pts_t.append(tot)
            pts_n.append(n_eq)
    numbers: dict[str, Any] = {
        "params": params,
        "fits_per_seed": pts["fits"],
        "n_eq_points": [{"active": a, "total": t, "n_eq": n} for a, t, n in zip(pts_a, pts_t, pts_n)],
        "points_without_n_eq": missing,
    }
    if len(pts_n) >= 2:
        alpha, se = fit_alpha(pts_a, pts_t, pts_n)
        numbers.update(alpha=alpha, alpha_se=se, alpha_interval=[alpha - 2 * se, alpha + 2 * se])
    dense = pts["dense"]
    mean_fit = fit_power_law([sizes[d][1] for d in dense], [res[d]["mean"]["val_loss"] for d in dense])
    plot = out / "sqrt-rule.png"
    _plot(
        [(sizes[d][1], res[d]["mean"]["val_loss"]) for d in dense],
        [
            (f"E{e}", math.sqrt(sizes[f"E{e}"][0] * sizes[f"E{e}"][1]), res[f"E{e}"]["mean"]["val_loss"])
            for e in EXPERTS
        ],
        mean_fit,
        plot,
    )
    return StudyResult.scored(
        score(res, numbers),
        name="sqrt-rule",
        claim="an MoE's dense-equivalent size is sqrt(active x total) (alpha = 0.5)",
        method=(
            f"dense ladder ffn_hidden={[w * h for w in WIDTHS]} fitted per seed as L = a*N^-b + c; "
            f"MoE E={list(EXPERTS)}, k=2 inverted to N_eq; alpha from log(N_eq/T) = alpha*log(A/T), one per seed"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=res,
        numbers=numbers,
        plots=[str(plot)],
    )

"""Study ``iso-flop``: how many times the training FLOPs an iso-active dense model needs to reach an MoE's loss.

Claim (seed note 002): at equal training FLOPs an MoE reaches a lower loss, i.e. its **compute
multiplier** — the dense FLOPs needed to reach the MoE's final loss ÷ the MoE's FLOPs — exceeds 1.

Method. Every run has a complete warmup–stable–decay schedule: a loss read in the middle of a longer
schedule is not the loss of a smaller budget (its LR has not decayed), so the dense side is a **budget
ladder** (``moelab.experiment.ladder``): the iso-active twin at :data:`LADDER` × the MoE's steps, every
smaller budget a cooldown branch of one trunk per seed (equal to an independent run of that budget). The
MoEs (E = :data:`EXPERTS`, k = 2, same expert width, so they share one iso-active twin) train the base
budget. Per seed, the dense ladder's validation loss is fitted against training FLOPs with a saturating
power law ``L(C) = a·(C/C0)^(−b) + c`` (:func:`moelab.stats.fit_power_law`), inverted at that seed's MoE
loss, and divided by that MoE's FLOPs (:func:`moelab.stats.compute_multiplier`). FLOPs = calc's training
FLOPs per token (attention included) × tokens.

Verdict (:data:`RULE`, headline E = 8): on the per-seed log multipliers, a t test against 0 (multiplier 1);
supported when significant and the geometric mean is at least 1.05 (5% of compute: less is no reason to
choose an MoE), not supported when significant below 1 or the interval lies inside [1/1.05, 1.05]. A
multiplier read outside the losses the dense ladder measured is an extrapolation of the fit: then the
verdict is inconclusive ("extend the ladder"), whatever the numbers say.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.config import ModelConfig, MoEConfig, RunConfig
from moelab.data.prepare import PreparedData
from moelab.experiment.ladder import BudgetPoint, LadderJob, train_ladder_job
from moelab.experiment.run import prepare
from moelab.experiment.runs import RunOutcome, RunSpec, map_on_data, run_one
from moelab.model.transformer import Transformer
from moelab.model.twins import count_params, dense_twin
from moelab.stats import Multiplier, Rule, compute_multiplier, decide
from moelab.studies import plots
from moelab.studies.base import (
    SCORES,
    STUDIES,
    Scored,
    StudyResult,
    arm_summary,
    base_run,
    data_label,
    summarise,
)

FULL_STEPS = 1000  # the MoE's budget at --budget full: past the step where the tiny MoE overtakes its twin (≈600)
EXPERTS = (8, 16, 32)
SMOKE_EXPERTS = (4, 8)
HEADLINE = "E8"
LADDER = (0.25, 0.5, 1.0, 2.0, 4.0)  # dense budgets as multiples of the MoE's steps (>= 4 points: a floor is fitted)
SMOKE_LADDER = (0.5, 1.0, 2.0, 4.0)
DECAY_FRACTION = 0.2

# Declared before any run: the log of the compute multiplier, higher is the claim, at least 5% of compute.
RULE = Rule(metric="log_multiplier", lower_is_better=False, min_effect=math.log(1.05), alpha=0.05, paired=True,
            unit="(log of dense FLOPs / MoE FLOPs)")  # fmt: skip


def _base(budget: str) -> RunConfig:
    base = base_run(budget, FULL_STEPS)  # fp32: at d_model 128 bf16 autocast is no faster on CPU (docs/training.md)
    train = replace(base.train, schedule="wsd", decay_fraction=DECAY_FRACTION, eval_every=0)
    return replace(base, train=train)  # one evaluation, at the end of each complete schedule


def budgets_for(steps: int, multiples: tuple[float, ...]) -> list[int]:
    return sorted({max(1, round(m * steps)) for m in multiples})


def multiplier_sentence(name: str, m: dict[str, Any], verdict: str) -> str:
    """"dense needs 1.13× [1.02, 1.25] the training FLOPs to reach E8's loss (…): supported"."""
    t, boot = m.get("t_interval") or {}, m.get("interval") or {}

    def x(v: Any) -> str:
        return "∞" if v is None else f"{v:.2f}×"

    seeds = len(m["per_seed"])
    above = sum(1 for v in m["per_seed"] if v is None or v > 1)
    return (
        f"dense needs {x(m['geometric_mean'])} [{x(t.get('low'))}, {x(t.get('high'))}] the training FLOPs to reach "
        f"{name}'s loss (geometric mean over {seeds} seeds, t interval on logs; bootstrap [{x(boot.get('low'))}, "
        f"{x(boot.get('high'))}]), {above}/{seeds} seeds above 1×: {verdict}"
    )


def judge(name: str, m: Multiplier) -> tuple[str, str, dict[str, Any]]:
    """The verdict of :data:`RULE` on one MoE's multipliers: (verdict, sentence, detail)."""
    detail = {"multiplier": m.to_json()}
    if any(m.unreachable) or any(m.extrapolated):
        where = [i for i, (u, e) in enumerate(zip(m.unreachable, m.extrapolated)) if u or e]
        reason = (
            f"the MoE's loss lies outside the losses the dense ladder measured for seed(s) {where}: the multiplier "
            "is an extrapolation of the fit; extend the ladder"
        )
        detail["reason"] = reason
        return "inconclusive", multiplier_sentence(name, detail["multiplier"], "inconclusive") + f" ({reason})", detail
    logs = [math.log(v) for v in m.per_seed]
    v = decide(RULE, logs, [0.0] * len(logs), f"log multiplier {name}", "0")
    detail["verdict"] = v.to_json()
    return v.verdict, multiplier_sentence(name, detail["multiplier"], v.verdict) + f" ({v.reason})", detail


def multipliers(arms: dict[str, Any], numbers: dict[str, Any]) -> dict[str, Multiplier]:
    """Every MoE arm's compute multiplier against the dense ladder of its seed (seeds in arm order)."""
    ladder = numbers["ladder"]
    seeds = [str(s) for s in numbers["seeds"]]
    dense_flops = [[p["flops"] for p in ladder[s]] for s in seeds]
    dense_loss = [[p["val_loss"] for p in ladder[s]] for s in seeds]
    out = {}
    for arm in numbers["moe_arms"]:
        ps = arms[arm]["per_seed"]
        out[arm] = compute_multiplier(dense_flops, dense_loss, ps["train_flops"], ps["val_loss"])
    return out


@SCORES.register("iso-flop")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    """The headline MoE's verdict; every MoE's multiplier and verdict in the detail."""
    found = {arm: judge(arm, m) for arm, m in multipliers(arms, numbers).items()}
    verdict, sentence, _ = found[numbers.get("headline", HEADLINE)]
    detail = {"headline": numbers.get("headline", HEADLINE), "per_arm": {a: f[2] | {"verdict": f[0], "sentence": f[1]}
                                                                       for a, f in found.items()}}  # fmt: skip
    return Scored(verdict, sentence, detail, RULE.to_json())


def _plot(arms: dict[str, Any], numbers: dict[str, Any], fits: dict[str, Multiplier], path: Path) -> None:
    """Validation loss vs training FLOPs: each seed's dense ladder (points and fitted curve) and MoE points."""
    import numpy as np

    fig, ax = plots.subplots(figsize=(7.5, 4.8))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    markers = ["o", "s", "^", "D", "v", "P"]
    seeds = [str(s) for s in numbers["seeds"]]
    fit_list = next(iter(fits.values())).fits if fits else ()
    for i, s in enumerate(seeds):
        pts = numbers["ladder"][s]
        c = colors[i % len(colors)]
        xs = [p["flops"] for p in pts]
        ax.plot(xs, [p["val_loss"] for p in pts], "o", color=c, ms=5, label=f"dense ladder, seed {s}")
        if i < len(fit_list):
            grid = np.geomspace(min(xs), max(xs), 100)
            ax.plot(grid, [fit_list[i](x) for x in grid], "-", color=c, lw=0.8, alpha=0.7)
    for j, arm in enumerate(numbers["moe_arms"]):
        ps = arms[arm]["per_seed"]
        ax.scatter(ps["train_flops"], ps["val_loss"], marker=markers[(j + 1) % len(markers)], s=45,
                   facecolors="none", edgecolors="k", label=f"MoE {arm} (one per seed)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (calc, attention included); every point a complete schedule")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("dense ladder fits L(C) = a·(C/C0)^-b + c per seed; MoE points read off them", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    plots.save(fig, path, dpi=100)


def _train(item: RunSpec | LadderJob, data: PreparedData) -> RunOutcome | list[BudgetPoint]:
    """One unit of the study's work: an MoE run or a seed's whole dense ladder (both picklable)."""
    return train_ladder_job(item, data) if isinstance(item, LadderJob) else run_one(item, data)


def train_all(
    base: RunConfig, moe_arms: dict[str, ModelConfig], twin: ModelConfig, budgets: list[int], seeds: list[int],
    out: Path, data: PreparedData, jobs: int,
) -> tuple[dict[str, list[RunOutcome]], dict[int, list[BudgetPoint]]]:
    """Every MoE run and every seed's dense ladder in one pool, longest first (the ladders), so that ``jobs``
    workers stay busy to the end; returns (arm → outcomes in seed order, seed → ladder points)."""
    vocab = data.tokenizer.vocab_size
    ladders = [LadderJob(replace(base, model=twin, train=replace(base.train, seed=s)), tuple(budgets),
                         out / "dense_ladder" / f"seed{s}", "branch") for s in seeds]  # fmt: skip
    runs = [
        RunSpec(arm, s, replace(base, name=f"{arm}-s{s}", model=replace(cfg, vocab_size=vocab),
                                train=replace(base.train, seed=s)), out / "moe" / arm / f"seed{s}")
        for arm, cfg in moe_arms.items() for s in seeds
    ]  # fmt: skip
    done = map_on_data(_train, [*ladders, *runs], data, jobs)
    points = dict(zip(seeds, done[: len(ladders)]))
    outcomes: dict[str, list[RunOutcome]] = {arm: [] for arm in moe_arms}
    for spec, o in zip(runs, done[len(ladders) :]):
        outcomes[spec.name].append(o)
    return outcomes, points


def rung_numbers(steps: int, points: list[BudgetPoint], counts) -> dict[str, list[float]]:
    """One ladder rung's per-seed numbers: its final loss and the budget columns a run's row has
    (:data:`moelab.studies.arms.BUDGET_METRICS`), the twin's parameter ``counts`` for every rung."""
    tokens = [float(p.tokens) for p in points]
    return {
        "val_loss": [p.val_loss for p in points],
        "steps": [float(steps)] * len(points),
        "tokens": tokens,
        "train_flops": [p.flops for p in points],
        "params_active": [float(counts.active)] * len(points),
        "params_total": [float(counts.total)] * len(points),
        "tokens_per_active_param": [t / max(counts.active, 1) for t in tokens],
    }


@STUDIES.register("iso-flop")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base, data = prepare(_base(budget))
    steps = base.train.steps
    moe0 = base.model.moe or MoEConfig()
    experts = SMOKE_EXPERTS if budget == "smoke" else EXPERTS
    moe_arms = {f"E{e}": replace(base.model, moe=replace(moe0, num_experts=e, top_k=2)) for e in experts}
    twin = dense_twin(moe_arms["E8"], "iso_active")  # the same for every E: k and the expert width are fixed
    budgets = budgets_for(steps, SMOKE_LADDER if budget == "smoke" else LADDER)
    outcomes, ladders = train_all(base, moe_arms, twin, budgets, seeds, out, data, jobs)
    res = summarise(outcomes)
    twin_counts = count_params(Transformer(replace(twin, vocab_size=data.tokenizer.vocab_size)))
    for i, b in enumerate(budgets):  # the ladder's rungs as arms of the page's table, with their budget
        res[f"dense_{b}steps"] = arm_summary(rung_numbers(b, [ladders[s][i] for s in seeds], twin_counts))
    numbers: dict[str, Any] = {
        "seeds": seeds,
        "headline": HEADLINE,
        "moe_arms": list(moe_arms),
        "budgets": budgets,
        "moe_steps": steps,
        "ladder": {str(s): [p.to_json() for p in ladders[s]] for s in seeds},
    }
    scored = score(res, numbers)
    fits = multipliers(res, numbers)
    numbers["multiplier"] = {arm: m.to_json() for arm, m in fits.items()}
    plot = out / "iso-flop.png"
    _plot(res, numbers, fits, plot)
    return StudyResult.scored(
        scored,
        name="iso-flop",
        claim="an MoE (E 8, k 2) reaches its final loss with fewer training FLOPs than an iso-active dense model",
        method=(
            f"MoE E={list(experts)}, k=2, {steps} steps; their iso-active dense twin on a budget ladder of "
            f"{budgets} steps (warmup-stable-decay, decay over the last {DECAY_FRACTION:.0%}; every smaller budget a "
            "cooldown branch of one trunk per seed, equal to a complete run), fp32; per seed the dense "
            "loss-vs-FLOPs points are fitted with L(C) = a(C/C0)^-b + c and inverted at the MoE's loss: "
            "multiplier = dense FLOPs to reach it / MoE FLOPs; seeds combined by the geometric mean"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=res,
        numbers=numbers,
        plots=[str(plot)],
    )

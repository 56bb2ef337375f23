"""Arms of a study trained on one prepared corpus, every (arm, seed) through
:func:`moelab.experiment.runs.run_all`, and summarised as mean ± sd over seeds.

Why through ``run_all``: a study's runs are the same kind of thing as ``moelab compare``'s (one
model, one seed, the shared data, its own folder), so they are trained by the same code, ``jobs``
at a time. A study looks at each trained model with a *probe* ``probe(run: TrainedRun) -> dict``
that runs in the process that trained it; probes are module-level functions (or
``functools.partial`` of one) so that they travel to worker processes. A probe's numeric values
become per-seed metrics of the arm; anything else (curves, per-layer lists) stays in
``RunOutcome.probe`` for the study to read.

Same seed ⇒ same data order and same validation batches in every arm: that is what makes the
arms' per-seed numbers *paired* for :mod:`moelab.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.config import ModelConfig, RunConfig, run_preset
from moelab.data.prepare import PreparedData
from moelab.errors import UserError
from moelab.experiment.run import RunRecord
from moelab.experiment.runs import Probe, RunOutcome, RunSpec, run_all
from moelab.studies.result import BUDGETS, arm_summary, mean_std


def shared_corpus(start: Path | None = None) -> Path | None:
    """``shared/corpus`` beside the repository root (as tests/helpers.py looks), or None."""
    here = (start or Path(__file__)).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "corpus"
        if (parent / "pyproject.toml").is_file() and cand.is_dir():
            return cand
    return None


GPU_STEP_FACTOR = 10  # --budget gpu: each study's full steps × this ...
GPU_BATCH_FACTOR = 2  # ... at this × the batch: 20× the tokens of --budget full


def check_budget(budget: str) -> None:
    """One clear error for a budget this machine cannot run: an unknown name, or ``gpu`` without CUDA."""
    if budget not in BUDGETS:
        raise UserError(f"unknown budget {budget!r}: expected one of {', '.join(BUDGETS)}")
    if budget == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                "--budget gpu trains on CUDA and no CUDA device is visible here (torch.cuda.is_available() is "
                "False): run --budget full on CPU, or run on a machine with a GPU and a CUDA build of torch"
            )


def base_run(budget: str, full_steps: int = 200) -> RunConfig:
    """The run every arm starts from: the ``smoke`` preset shrunk further, or ``tiny`` for full and gpu.

    ``full`` trains the ``tiny`` model for ``full_steps`` steps (each study picks its own so that
    every arm and seed fit in a few minutes to an hour on 2 CPU cores: the preset's 1000 steps
    × arms × seeds would take hours), warm-up a twentieth of that (at most 50 steps), and evaluates
    only at the end unless the study asks for curves. ``gpu`` is the same model at
    ``GPU_STEP_FACTOR`` × the steps and ``GPU_BATCH_FACTOR`` × the batch (20× the tokens) on CUDA with
    bf16 autocast, the warm-up scaled with the steps.
    """
    check_budget(budget)
    if budget == "smoke":
        cfg = run_preset("smoke")
        tr = replace(
            cfg.train,
            steps=8,
            batch_size=4,
            warmup_steps=2,
            eval_every=0,
            eval_batches=2,
            log_every=4,
            progress=False,
        )
        data = replace(cfg.data, corpus="builtin", max_bytes_per_domain=20_000, synthetic_docs=20)
        return replace(cfg, train=tr, data=data)
    cfg = run_preset("tiny")
    corpus = shared_corpus()
    data = replace(cfg.data, corpus=str(corpus)) if corpus else cfg.data
    train = replace(
        cfg.train, steps=full_steps, warmup_steps=min(50, full_steps // 4), eval_every=0, progress=False
    )
    if budget == "gpu":
        steps = full_steps * GPU_STEP_FACTOR
        train = replace(
            train,
            steps=steps,
            batch_size=train.batch_size * GPU_BATCH_FACTOR,
            warmup_steps=min(50 * GPU_STEP_FACTOR, steps // 4),
            device="cuda",
            precision="bf16",
        )
    return replace(cfg, data=data, train=train)


def data_label(base: RunConfig) -> str:
    """Which corpus a study used, as a reader of the page finds it (the shared corpus by its
    place beside the repository, not this machine's absolute path)."""
    corpus = base.data.corpus
    shared = shared_corpus()
    if shared is not None and Path(corpus).expanduser().resolve() == shared.resolve():
        corpus = "../shared/corpus"
    return f"{corpus} (tokenizer {base.data.tokenizer})"


def _arm_run(base: RunConfig, arm: str, cfg: ModelConfig | RunConfig, seed: int, vocab: int) -> RunConfig:
    """The complete config of one (arm, seed) run. An arm given as a whole ``RunConfig`` may differ
    from ``base`` in anything the prepared data does not depend on (e.g. ``data.train_fraction``)."""
    if isinstance(cfg, RunConfig):
        if replace(cfg.data, train_fraction=base.data.train_fraction) != base.data:
            raise ValueError(
                f"arm {arm!r} prepares other data than the study's base run: train it separately"
            )
        run, model = cfg, cfg.model
    else:
        run, model = base, cfg
    return replace(
        run,
        name=f"{arm}-s{seed}",
        model=replace(model, vocab_size=vocab),
        train=replace(run.train, seed=seed),
    )


def train_outcomes(
    base: RunConfig,
    arms: Mapping[str, ModelConfig | RunConfig],
    seeds: Sequence[int],
    out: Path,
    probe: Probe | None = None,
    jobs: int = 1,
    data: PreparedData | None = None,
) -> dict[str, list[RunOutcome]]:
    """Train every arm for every seed on the same prepared data; ``{arm: [outcome per seed]}``.

    ``data`` is ``moelab.experiment.run.prepare(base)``'s (prepared here when None). ``jobs`` runs
    go side by side (:func:`moelab.experiment.runs.run_all`).
    """
    if data is None:
        from moelab.experiment.run import prepare

        base, data = prepare(base)
    vocab = data.tokenizer.vocab_size
    specs = [
        RunSpec(arm, seed, _arm_run(base, arm, cfg, seed, vocab), Path(out) / arm / f"seed{seed}", probe)
        for arm, cfg in arms.items()
        for seed in seeds
    ]
    by_arm: dict[str, list[RunOutcome]] = {arm: [] for arm in arms}
    for spec, outcome in zip(specs, run_all(specs, data, jobs=jobs)):
        by_arm[spec.name].append(outcome)  # seed order kept
    return by_arm


LR_FACTORS = (0.5, 1.0, 2.0)  # the grid around the preset's learning rate
TUNING_SEED = 1000  # the seed the learning rate is chosen on: no verdict uses it


def tune_lr(
    base: RunConfig,
    arms: Mapping[str, ModelConfig | RunConfig],
    out: Path,
    factors: Sequence[float] = LR_FACTORS,
    seed: int = TUNING_SEED,
    jobs: int = 1,
    data: PreparedData | None = None,
) -> tuple[dict[str, RunConfig], dict[str, Any]]:
    """Each arm at its own best learning rate: every arm trained once at ``base.train.lr × factor`` for
    each factor, on ``seed`` (a seed the verdict does not use, so choosing cannot flatter the paired
    numbers), into ``out``; the lowest final validation loss wins.

    Why: one learning rate for every arm favours the arm it happens to suit (finer experts, a shared
    expert or another router may want another one); a claim about architectures compares each at its
    best. Returns the arms as complete runs at their chosen rate, and ``{"seed", "grid": {arm: {lr:
    val_loss}}, "lr": {arm: lr}, "at_edge": [arms whose best rate is the grid's smallest or largest]}``."""
    if data is None:
        from moelab.experiment.run import prepare

        base, data = prepare(base)
    as_runs = {arm: cfg if isinstance(cfg, RunConfig) else replace(base, model=cfg) for arm, cfg in arms.items()}
    lrs = sorted({round(base.train.lr * f, 12) for f in factors})
    grid_arms = {
        f"{arm}@lr{lr:g}": replace(run, train=replace(run.train, lr=lr)) for arm, run in as_runs.items() for lr in lrs
    }
    outcomes = train_outcomes(base, grid_arms, [seed], out, jobs=jobs, data=data)
    grid: dict[str, dict[str, float]] = {}
    for arm in as_runs:
        grid[arm] = {f"{lr:g}": float(outcomes[f"{arm}@lr{lr:g}"][0].result.loss) for lr in lrs}
    best = {arm: min(lrs, key=lambda lr: _finite_or_inf(grid[arm][f"{lr:g}"])) for arm in as_runs}
    chosen = {arm: replace(run, train=replace(run.train, lr=best[arm])) for arm, run in as_runs.items()}
    at_edge = [arm for arm, lr in best.items() if len(lrs) > 1 and lr in (lrs[0], lrs[-1])]
    return chosen, {"seed": seed, "grid": grid, "lr": best, "at_edge": at_edge}


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# Per-run numbers that say how big the run was, not how it did (the page shows them as its budget).
BUDGET_METRICS = ("steps", "tokens", "train_flops", "params_active", "params_total", "tokens_per_active_param")


def budget_numbers(run: RunRecord) -> dict[str, float]:
    """A run's :data:`BUDGET_METRICS`: steps, tokens, training FLOPs, non-embedding parameters active
    per token and in total, tokens per active parameter."""
    return {
        "steps": float(run.steps),
        "tokens": float(run.tokens),
        "train_flops": run.flops_per_token * run.tokens,
        "params_active": float(run.counts.active),
        "params_total": float(run.counts.total),
        "tokens_per_active_param": run.tokens / max(run.counts.active, 1),
    }


def run_numbers(o: RunOutcome) -> dict[str, float]:
    """One run's per-seed metrics: final validation loss, then its budget (:func:`budget_numbers`),
    then the probe's numbers."""
    vals = {"val_loss": float(o.result.loss), **budget_numbers(o)}
    vals.update({k: float(v) for k, v in o.probe.items() if _is_number(v)})
    return vals


def summarise_budgets(per_arm: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, dict[str, Any]]:
    """Each arm's :data:`BUDGET_METRICS`, one :func:`budget_numbers`-shaped dict per seed, as an
    :func:`arm_summary` (``numbers["budget_arms"]``)."""
    return {arm: arm_summary({m: [n[m] for n in per] for m in BUDGET_METRICS}) for arm, per in per_arm.items()}


def budget_summary(outcomes: Mapping[str, list[RunOutcome]]) -> dict[str, dict[str, Any]]:
    """Each trained arm's :data:`BUDGET_METRICS` as an :func:`arm_summary`: for a study whose rows are
    not its runs (e.g. one row per label), stored as ``numbers["budget_arms"]`` so that its page and
    the index still state how far the runs were trained."""
    return summarise_budgets({arm: [budget_numbers(o) for o in runs] for arm, runs in outcomes.items()})


def summarise(
    outcomes: Mapping[str, list[RunOutcome]], curves: bool = False, by_label: bool = False
) -> dict[str, dict[str, Any]]:
    """Each arm's :func:`arm_summary` of :func:`run_numbers`, plus, when asked, its held-out curves
    (``arm["curves"] = [{"tokens", "flops", "val_loss"} per seed]``) and its final validation loss
    per label value (``arm["by_label"] = {label: {value: {"per_seed", "mean", "std"}}}``; a value
    missing from some seed's held-out set is left out)."""
    result: dict[str, dict[str, Any]] = {}
    for arm, runs in outcomes.items():
        per_seed: dict[str, list[float]] = {}
        labels: dict[str, dict[str, list[float]]] = {}
        for o in runs:
            for k, v in run_numbers(o).items():
                per_seed.setdefault(k, []).append(v)
            for name, by_value in (o.result.loss_by if by_label else {}).items():
                for value, loss in by_value.items():
                    labels.setdefault(name, {}).setdefault(str(value), []).append(float(loss))
        result[arm] = arm_summary(per_seed)
        if curves:
            result[arm]["curves"] = [
                {k: c[k] for k in ("tokens", "flops", "val_loss")} for c in (o.eval_curve() for o in runs)
            ]
        if labels:
            result[arm]["by_label"] = {
                name: {
                    value: {"per_seed": xs, "mean": mean_std(xs)[0], "std": mean_std(xs)[1]}
                    for value, xs in by_value.items()
                    if len(xs) == len(runs)
                }
                for name, by_value in labels.items()
            }
    return result


def train_arms(
    base: RunConfig,
    arms: Mapping[str, ModelConfig | RunConfig],
    seeds: Sequence[int],
    out: Path,
    probe: Probe | None = None,
    curves: bool = False,
    by_label: bool | None = None,
    jobs: int = 1,
    data: PreparedData | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`train_outcomes` then :func:`summarise` (``by_label`` defaults to on except at the
    smoke budget, whose base run is named ``smoke``)."""
    if by_label is None:
        by_label = base.name != "smoke"
    outcomes = train_outcomes(base, arms, seeds, out, probe=probe, jobs=jobs, data=data)
    return summarise(outcomes, curves=curves, by_label=by_label)

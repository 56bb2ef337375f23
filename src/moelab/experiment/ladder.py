"""Budget ladders: the validation loss of one model at several training budgets, each from a complete schedule.

Why: a loss read at step ``s`` of a longer run is not the loss of a run of ``s`` steps. Its learning
rate had not finished decaying (cosine depends on the total from the end of warmup), and the final
decay is worth a large share of the loss, so a mid-schedule point flatters the longer budget and
makes the shorter one look worse than it is. Every point here is the *final* evaluation of a run
whose schedule ended at that budget (eval records carry ``schedule_steps``), and
:func:`budget_record` refuses anything else with :class:`MidScheduleError`.

Two ways to get the points (:func:`run_ladder`):

- ``independent``: one complete run per budget ``B`` (``train.steps = B``); any schedule.
- ``branch`` (``train.schedule = "wsd"``): one *trunk* run of ``max(budgets)`` steps. A warmup–stable–decay
  schedule's LR does not depend on ``steps`` before its decay starts, so every smaller budget ``B``
  follows the trunk exactly up to ``decay_start(B)``. The trunk stops there (a checkpoint: weights,
  optimizer moments, RNG, sampler position), the checkpoint is copied into ``B``'s own run folder with
  the trunk's log up to that step, and a run with ``train.steps = B`` resumes from it and decays to
  ``B``. The result equals an independent run of ``B`` steps (bit for bit on CPU in fp32; tested) for
  the cost of the decay steps alone. The trunk itself is the complete run of the largest budget.

Folders: ``out/<mode>/steps_<B>/`` per budget (in branch mode the largest is the trunk) and
``out/<mode>/ladder.json``. The ladder refuses to start when any of them exists and is not empty: it
never overwrites or deletes what it did not create.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from numbers import Integral
from pathlib import Path
from typing import Any

from moelab.checkpoint.folder import checkpoint_name, latest_checkpoint
from moelab.config import ConfigError, RunConfig
from moelab.data.prepare import PreparedData
from moelab.errors import UserError
from moelab.experiment.run import TrainedRun, prepare, train_run
from moelab.train.logging import read_metrics
from moelab.train.schedule import decay_start, lr_at

MODES = ("independent", "branch")


class MidScheduleError(UserError):
    """A loss was asked for as the loss of a budget, but its run's learning rate had not finished decaying."""


@dataclass(frozen=True)
class BudgetPoint:
    """The final validation of a run whose schedule ended at ``steps``.

    ``source`` is ``"branch"`` for a WSD cooldown branch, else ``"independent"`` (a complete run of its
    own; in branch mode that is the trunk, the run of the largest budget). ``flops`` are training FLOPs
    (``flops_per_token × tokens``); ``loss_by`` is the eval record's ``val_loss_by`` (label → value → loss).
    """

    steps: int
    tokens: int
    flops: float
    val_loss: float
    seed: int
    source: str
    run_dir: str
    loss_by: dict

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def budget_record(records: list[dict], steps: int, where: str = "this run") -> dict:
    """The eval record at ``steps`` of a run whose schedule ended there: the loss of a budget of ``steps``.

    Raises :class:`MidScheduleError` when there is no eval at ``steps``, when that eval's
    ``schedule_steps`` differs from ``steps`` (it was read mid-schedule), or when it has no
    ``schedule_steps`` (a log written before schedules were recorded). ``where`` names the run in messages.
    """
    fix = (
        f"take the loss of a budget of {steps} steps from a complete run with train.steps={steps}, or from a "
        "WSD cooldown branch (moelab.experiment.ladder.run_ladder with mode='branch')"
    )
    evals = [r for r in records if r.get("kind") == "eval" and r.get("step") == steps]
    if not evals:
        at = sorted({r.get("step") for r in records if r.get("kind") == "eval"})
        raise MidScheduleError(f"{where} has no evaluation at step {steps} (evaluations at {at}): {fix}")
    rec = evals[-1]
    schedule_steps = rec.get("schedule_steps")
    if schedule_steps is None:
        raise MidScheduleError(
            f"the evaluation at step {steps} of {where} does not say where its learning-rate schedule ends "
            "(a log written before moelab recorded schedule_steps), so it may have been read mid-schedule: "
            f"re-run it; {fix}"
        )
    if schedule_steps != steps:
        raise MidScheduleError(
            f"the evaluation at step {steps} of {where} was read mid-schedule: that run's learning-rate schedule "
            f"ends at step {schedule_steps}, so at step {steps} its LR had not finished decaying and the loss is "
            f"not what a run of {steps} steps reaches (a complete schedule ends lower); {fix}"
        )
    return rec


def ladder_budgets(max_steps: int, n: int, min_steps: int | None = None) -> list[int]:
    """``n`` distinct step budgets from ``min_steps`` to ``max_steps``, evenly spaced in log scale, ascending.

    ``min_steps`` defaults to ``max_steps / 2**(n-1)`` (each budget twice the previous). Rounding that would
    make two budgets equal moves the later one up a step, so there are always exactly ``n``.
    """
    if not (isinstance(n, int) and n >= 1 and isinstance(max_steps, int) and max_steps >= 1):
        raise UserError(f"a budget ladder needs n >= 1 budgets and max_steps >= 1 (got n={n}, max_steps={max_steps})")
    if min_steps is None:
        min_steps = max(1, round(max_steps / 2 ** (n - 1)))
    if not 1 <= min_steps <= max_steps:
        raise UserError(f"min_steps={min_steps} must be in [1, max_steps={max_steps}]")
    if n == 1:
        return [max_steps]
    if n > max_steps - min_steps + 1:
        raise UserError(f"there are not {n} distinct budgets between {min_steps} and {max_steps} steps: lower n")
    ratio = max_steps / min_steps
    out: list[int] = []
    for i in range(n):
        b = round(min_steps * ratio ** (i / (n - 1)))
        low = out[-1] + 1 if out else min_steps
        high = max_steps - (n - 1 - i)  # room for the budgets still to come
        out.append(min(max(b, low), high))
    return out


def budget_config(base: RunConfig, steps: int) -> RunConfig:
    """``base`` with ``train.steps = steps`` (a UserError naming the budget when that config is invalid)."""
    try:
        return replace(base, train=replace(base.train, steps=steps))
    except ConfigError as exc:
        raise UserError(f"budget of {steps} steps: {exc}") from None


def branch_points(base: RunConfig, budgets: Sequence[int]) -> dict[int, list[int]]:
    """Where each smaller budget branches off the trunk (``max(budgets)`` steps): branch step → budgets.

    Checks the property branching rests on: the trunk's LR equals the budget's at every step before it.
    """
    trunk = budget_config(base, max(budgets)).train
    points: dict[int, list[int]] = {}
    for steps in sorted(set(budgets))[:-1]:
        tc = budget_config(base, steps).train
        at = decay_start(tc)
        if any(lr_at(s, tc) != lr_at(s, trunk) for s in range(at)):
            raise UserError(
                f"a run of {steps} steps does not follow the {max(budgets)}-step trunk's learning rate before "
                f"its decay (step {at}): train.schedule={base.train.schedule!r} cannot branch; use mode='independent'"
            )
        points.setdefault(at, []).append(steps)
    return points


def run_ladder(
    base: RunConfig,
    budgets: Sequence[int],
    out: str | Path,
    data: PreparedData | None = None,
    mode: str = "branch",
) -> list[BudgetPoint]:
    """Train ``base`` at every budget (steps) and return one :class:`BudgetPoint` per budget, ascending.

    ``data`` shares a corpus prepared by :func:`moelab.experiment.run.prepare` (prepared here when None).
    ``mode``: ``"independent"`` (one complete run per budget) or ``"branch"`` (WSD cooldown branches from
    one trunk; needs ``train.schedule = "wsd"``). Writes ``out/<mode>/ladder.json``.
    """
    if mode not in MODES:
        raise UserError(f"mode={mode!r} is invalid: expected one of {', '.join(map(repr, MODES))}")
    if not budgets or any(not isinstance(b, Integral) or isinstance(b, bool) or b < 1 for b in budgets):
        raise UserError(f"budgets must be positive step counts (got {list(budgets)})")
    budgets = sorted({int(b) for b in budgets})
    if mode == "branch" and base.train.schedule != "wsd":
        raise UserError(
            f"mode='branch' needs train.schedule='wsd' (got {base.train.schedule!r}): under a cosine schedule the "
            "learning rate depends on the budget from the end of warmup, so no longer run passes through a shorter "
            "one's schedule; set train.schedule=wsd or use mode='independent'"
        )
    configs = {b: budget_config(base, b) for b in budgets}
    points = branch_points(base, budgets) if mode == "branch" else {}
    root = Path(out) / mode
    dirs = {b: root / f"steps_{b:06d}" for b in budgets}
    _refuse_existing([*dirs.values(), root / "ladder.json"])
    if data is None:
        base, data = prepare(base)
        configs = {b: budget_config(base, b) for b in budgets}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    result: dict[int, BudgetPoint] = {}
    if mode == "independent":
        for b in budgets:
            result[b] = _point(train_run(configs[b], dirs[b], data), b, "independent")
    else:
        top = budgets[-1]
        trunk_dir = dirs[top]
        for at in sorted(points):  # the trunk, stopping at every branch point in turn
            train_run(configs[top], trunk_dir, data, resume=True, stop_at=at)
            ckpt = latest_checkpoint(trunk_dir)
            if ckpt is None or ckpt.name != checkpoint_name(at):
                raise UserError(f"the trunk {trunk_dir} has no checkpoint at its branch step {at}")
            for b in points[at]:
                _seed_branch(trunk_dir, ckpt, dirs[b], at, b)
        result[top] = _point(train_run(configs[top], trunk_dir, data, resume=True), top, "independent")
        for b in budgets[:-1]:
            # the branch resumes the trunk's checkpoint with its own train.steps: a change it means to make
            result[b] = _point(train_run(configs[b], dirs[b], data, resume=True, allow_config_change=True), b, "branch")

    ladder = [result[b] for b in budgets]
    summary = {"mode": mode, "budgets": budgets, "points": [p.to_json() for p in ladder]}
    if mode == "branch":
        summary["trunk"] = str(dirs[budgets[-1]])
        summary["branch_steps"] = {str(b): at for at, bs in points.items() for b in bs}
    (root / "ladder.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return ladder


@dataclass(frozen=True)
class LadderJob:
    """One seed's ladder for :func:`run_ladders` (picklable: it travels to a worker process)."""

    base: RunConfig  # train.seed set
    budgets: tuple[int, ...]
    out: Path
    mode: str


def train_ladder_job(job: LadderJob, data: PreparedData) -> list[BudgetPoint]:
    """:func:`run_ladder` of one :class:`LadderJob` (a unit of work for ``moelab.experiment.runs.map_on_data``)."""
    return run_ladder(job.base, job.budgets, job.out, data, job.mode)


def run_ladders(
    base: RunConfig,
    budgets: Sequence[int],
    seeds: Sequence[int],
    out: str | Path,
    data: PreparedData,
    mode: str = "branch",
    jobs: int = 1,
) -> dict[int, list[BudgetPoint]]:
    """:func:`run_ladder` once per seed (``train.seed = seed``, folder ``out/seed<S>``), ``jobs`` seeds side
    by side (``moelab.experiment.runs.map_on_data``); returns seed → its points, ascending budgets."""
    from moelab.experiment.runs import map_on_data

    ladder_jobs = [
        LadderJob(replace(base, train=replace(base.train, seed=s)), tuple(budgets), Path(out) / f"seed{s}", mode)
        for s in seeds
    ]
    return dict(zip(seeds, map_on_data(train_ladder_job, ladder_jobs, data, jobs)))


def _refuse_existing(paths: list[Path]) -> None:
    """Refuse to start when a folder or file the ladder would write already holds something."""
    for p in paths:
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise UserError(
                f"{p} already exists and is not empty: a budget ladder never overwrites or deletes what it did not "
                "create; choose another output folder or move it away"
            )


def _seed_branch(trunk_dir: Path, ckpt: Path, branch_dir: Path, at: int, steps: int) -> None:
    """Start the run of ``steps`` steps in ``branch_dir`` from the trunk's checkpoint at step ``at``.

    The trunk's log up to ``at`` comes along, so the branch's metrics.jsonl reads as a whole run of
    ``steps`` steps; its eval records get ``schedule_steps = steps``, which is true: up to ``at`` the trunk
    followed exactly the LR of a ``steps``-step run. ``branch.json`` records where the branch came from.
    """
    shutil.copytree(ckpt, branch_dir / "checkpoints" / ckpt.name)
    lines = []
    for r in read_metrics(trunk_dir):
        if r.get("step", 0) > at:
            continue
        if r.get("kind") == "eval":
            r = {**r, "schedule_steps": steps}
        lines.append(json.dumps(r) + "\n")
    (branch_dir / "metrics.jsonl").write_text("".join(lines), encoding="utf-8")
    origin = {"trunk": str(trunk_dir), "checkpoint": str(ckpt), "branch_step": at, "steps": steps}
    (branch_dir / "branch.json").write_text(json.dumps(origin, indent=1) + "\n", encoding="utf-8")


def _point(run: TrainedRun, steps: int, source: str) -> BudgetPoint:
    rec = budget_record(run.records, steps, where=str(run.run_dir))
    return BudgetPoint(
        steps=steps,
        tokens=int(rec["tokens"]),
        flops=run.flops_per_token * rec["tokens"],
        val_loss=float(rec["val_loss"]),
        seed=run.cfg.train.seed,
        source=source,
        run_dir=str(run.run_dir),
        loss_by=rec.get("val_loss_by") or {},
    )

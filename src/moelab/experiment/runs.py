"""Many runs on one prepared corpus: every (model, seed) of a comparison or a study, side by side.

Why: the models moelab compares on a CPU are small enough that a second intra-op thread barely
speeds a run up, while two runs side by side, one thread each, take half the time. Every run is
independent (its own seed, the same prepared data, the same order of blocks for the same seed), so
the numbers equal a sequential run with the same threads per run (tested).

A run's ``probe`` looks at the trained model *in the process that trained it* and returns a
JSON-able dict (routing analysis, drop rates, …): the model never travels between processes and
no checkpoint is re-read. Probes sent to worker processes must be picklable (a module-level
function, or ``functools.partial`` of one); others run the whole batch in this process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from moelab.config import RunConfig
from moelab.data.prepare import PreparedData
from moelab.errors import UserError
from moelab.experiment.run import RunRecord, TrainedRun, train_run

Probe = Callable[[TrainedRun], dict[str, Any]]


@dataclass(frozen=True)
class RunSpec:
    """One run of a batch: ``name`` (model or arm), its seed and complete config, its folder."""

    name: str
    seed: int
    cfg: RunConfig  # train.seed == seed
    run_dir: Path
    probe: Probe | None = None


@dataclass
class RunOutcome(RunRecord):
    """A :class:`TrainedRun` without the model, from a batch of runs: its name and seed, the numbers a
    comparison needs and what its probe found; picklable."""

    name: str
    seed: int
    probe: dict[str, Any] = field(default_factory=dict)


def outcome_of(spec: RunSpec, run: TrainedRun) -> RunOutcome:
    """Probe ``run`` (in this process: the model is here) and keep its record."""
    record = {f.name: getattr(run, f.name) for f in fields(RunRecord)}
    return RunOutcome(**record, name=spec.name, seed=spec.seed, probe=spec.probe(run) if spec.probe else {})


def run_one(spec: RunSpec, data: PreparedData) -> RunOutcome:
    """Train ``spec`` on ``data`` in this process and probe it."""
    return outcome_of(spec, train_run(spec.cfg, spec.run_dir, data=data))


_WORKER: dict[str, Any] = {}  # per worker process: the prepared data, received once


def _init_worker(data_bytes: bytes, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["data"] = pickle.loads(data_bytes)


def _call_in_worker(job: tuple[Callable[[Any, PreparedData], Any], Any]) -> Any:
    fn, item = job
    return fn(item, _WORKER["data"])


def default_jobs(n_runs: int) -> int:
    """Runs side by side when the caller does not say: one per core, at most one per run."""
    return max(1, min(n_runs, os.cpu_count() or 1, torch.get_num_threads()))


def threads_per_job(jobs: int) -> int:
    """Torch threads of each of ``jobs`` runs side by side (all of them when one run at a time)."""
    return torch.get_num_threads() if jobs <= 1 else max(1, torch.get_num_threads() // jobs)


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # closures and lambdas: run in this process
        return False
    return True


def map_on_data(fn: Callable[[Any, PreparedData], Any], items: Sequence[Any], data: PreparedData, jobs: int = 1) -> list:
    """``[fn(item, data) for item in items]``, ``jobs`` at a time in worker processes that each receive
    ``data`` once and run on :func:`threads_per_job` threads; in this process when ``jobs`` is 1 or
    ``fn``/``items`` cannot be pickled. Results in the order of ``items``."""
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    jobs = min(jobs, len(items))
    if jobs <= 1 or not _picklable((fn, list(items))):
        return [fn(item, data) for item in items]
    ctx = mp.get_context("spawn")  # no fork after torch's thread pool has started
    payload = pickle.dumps(data)
    with ctx.Pool(jobs, initializer=_init_worker, initargs=(payload, threads_per_job(jobs))) as pool:
        return pool.map(_call_in_worker, [(fn, item) for item in items], chunksize=1)


def run_all(specs: Sequence[RunSpec], data: PreparedData, jobs: int = 1) -> list[RunOutcome]:
    """Train every spec on ``data`` (``jobs`` at a time, each on :func:`threads_per_job` threads);
    outcomes in the order of ``specs``. Folders must be distinct."""
    dirs = [Path(s.run_dir).resolve() for s in specs]
    if len(set(dirs)) != len(dirs):
        raise UserError("two runs of one batch share a run folder: give each (name, seed) its own folder")
    return map_on_data(run_one, specs, data, jobs)

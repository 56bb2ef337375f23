"""Train a study's (arm, seed) runs in several one-process-each jobs.

Why: the full-budget models are so small that a second intra-op thread barely speeds a run up,
while two runs side by side, one thread each, take half the time. Every run is independent (its
own seed, the same prepared data), so the numbers equal a sequential run with the same threads
per run: each worker prepares the data once (deterministic) and trains its runs exactly as
:func:`moelab.studies.base.train_arms` would.

Only runs without an ``extra`` probe go through here: probes are closures over a study's state
and stay in the parent process (``train_arms`` falls back to sequential for them).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelab.config import ModelConfig, RunConfig

_DATA: dict[str, Any] = {}  # per worker process: the prepared data, built once by _init


@dataclass(frozen=True)
class RunSpec:
    """One (arm, seed) run: everything a worker needs, all picklable."""

    arm: str
    seed: int
    model: ModelConfig
    base: RunConfig
    run_dir: Path


def _init(base: RunConfig, threads: int) -> None:
    import torch

    from moelab.data.prepare import prepare_data

    torch.set_num_threads(threads)
    _DATA["data"] = prepare_data(base)[1]


def _train(spec: RunSpec) -> tuple[Any, ...]:
    from moelab.studies.base import train_one

    return train_one(spec, _DATA["data"])


def run_parallel(specs: list[RunSpec], base: RunConfig, jobs: int, threads: int) -> list[tuple[Any, ...]]:
    """Results of :func:`moelab.studies.base.train_one` for every spec, in order."""
    ctx = mp.get_context("spawn")  # no fork after torch's thread pool has started
    with ctx.Pool(jobs, initializer=_init, initargs=(base, threads)) as pool:
        return pool.map(_train, specs, chunksize=1)


def parallel_ok(extra: Callable | None, jobs: int, n_runs: int) -> bool:
    return jobs > 1 and extra is None and n_runs > 1

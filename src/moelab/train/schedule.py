"""Learning-rate schedules, chosen by name (``train.schedule``): warmup + cosine, and warmup–stable–decay.

Why a registry: the schedule decides which losses are comparable. A cosine run of ``steps`` steps has an
LR that depends on ``steps`` from the first step after warmup, so a loss read at step ``s < steps`` is
*not* the loss of a run of ``s`` steps (its LR never finished decaying). Warmup–stable–decay (WSD) holds
``lr`` constant until the last ``decay_steps`` steps, so every shorter WSD budget follows the same LR as a
longer one up to its :func:`decay_start`: a "cooldown branch" resumed from a long run's checkpoint at that
step and decayed to ``B`` *is* a complete run of ``B`` steps (``moelab.experiment.ladder``).

A schedule is two pure functions of the config: ``lr_at(step, cfg)`` (0-based optimizer step) and
``decay_start(cfg)`` (the first step whose LR depends on ``cfg.steps``). Resuming needs only the step.

WSD's decay (``cfg.decay_shape``), with ``p`` the share of the decay done *after* the step, in (0, 1]:
``linear`` 1 − p; ``sqrt`` 1 − √p (the cooldown of Hägele et al. 2024, "Scaling laws and compute-optimal
training beyond fixed training durations"); ``cosine`` ½(1 + cos πp). The LR is
``floor + (lr − floor)·shape(p)`` with ``floor = lr·min_lr_ratio``, so the last step (``steps − 1``,
``p = 1``) is at the floor, as cosine's is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from moelab.config import TrainConfig
from moelab.registry import Registry


class Schedule:
    """What every schedule provides (registered classes use static methods; no instance state)."""

    @staticmethod
    def lr_at(step: int, cfg: TrainConfig) -> float:
        raise NotImplementedError

    @staticmethod
    def decay_start(cfg: TrainConfig) -> int:
        raise NotImplementedError


SCHEDULES: Registry[type[Schedule]] = Registry("learning-rate schedule")


def _warmup(step: int, cfg: TrainConfig) -> float:
    """Linear warmup: step 0 gets lr/warmup_steps, step warmup_steps − 1 gets lr."""
    return cfg.lr * (step + 1) / cfg.warmup_steps


@SCHEDULES.register("cosine")
class Cosine(Schedule):
    """Linear warmup over ``warmup_steps``, then a cosine from ``lr`` to ``lr·min_lr_ratio`` at step ``steps − 1``.

    Every step after warmup depends on ``steps``, so :meth:`decay_start` is the end of warmup.
    """

    @staticmethod
    def lr_at(step: int, cfg: TrainConfig) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return _warmup(step, cfg)
        decay_steps = max(1, cfg.steps - cfg.warmup_steps - 1)
        progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @staticmethod
    def decay_start(cfg: TrainConfig) -> int:
        return cfg.warmup_steps


DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1.0 - p,
    "sqrt": lambda p: 1.0 - math.sqrt(p),
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
}


def decay_steps(cfg: TrainConfig) -> int:
    """Steps in WSD's final decay: ``max(1, round(decay_fraction · steps))``."""
    return max(1, round(cfg.decay_fraction * cfg.steps))


@SCHEDULES.register("wsd")
class WarmupStableDecay(Schedule):
    """Linear warmup, ``lr`` held constant, then a decay over the last :func:`decay_steps` steps.

    Steps before :meth:`decay_start` have an LR that does not depend on ``steps`` (``TrainConfig`` checks
    that warmup and decay do not overlap), which is what makes cooldown branches exact.
    """

    @staticmethod
    def lr_at(step: int, cfg: TrainConfig) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return _warmup(step, cfg)
        start = WarmupStableDecay.decay_start(cfg)
        if step < start:
            return cfg.lr
        progress = min(1.0, (step - start + 1) / decay_steps(cfg))
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + (cfg.lr - floor) * DECAY_SHAPES[cfg.decay_shape](progress)

    @staticmethod
    def decay_start(cfg: TrainConfig) -> int:
        return cfg.steps - decay_steps(cfg)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) under ``cfg.schedule``."""
    return SCHEDULES[cfg.schedule].lr_at(step, cfg)


def decay_start(cfg: TrainConfig) -> int:
    """The first step whose LR depends on ``cfg.steps`` (cosine: the end of warmup; WSD: the first decay step).

    Two runs that differ only in ``steps`` have the same LR at every step before the smaller one's decay start.
    """
    return SCHEDULES[cfg.schedule].decay_start(cfg)


def lr_sequence(cfg: TrainConfig) -> list[float]:
    """The LR of every step ``0 … steps − 1``: what a run of this config follows."""
    return [lr_at(step, cfg) for step in range(cfg.steps)]

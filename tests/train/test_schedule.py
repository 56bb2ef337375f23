"""Learning-rate schedules: cosine unchanged by the registry, WSD's phases and decay shapes, config checks."""

from __future__ import annotations

import itertools
import math

import pytest

from moelab.config import DECAY_SHAPES, SCHEDULE_NAMES, ConfigError, TrainConfig
from moelab.train import optim, schedule
from moelab.train.schedule import SCHEDULES, decay_start, decay_steps, lr_at, lr_sequence


def _old_cosine(step: int, cfg: TrainConfig) -> float:
    """The warmup + cosine of moelab before schedules were registered, written out again."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    n = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / n)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _wsd(**kw) -> TrainConfig:
    base = dict(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    return TrainConfig(**{**base, **kw})


def test_config_names_are_the_registered_ones() -> None:
    assert set(SCHEDULE_NAMES) == set(SCHEDULES) == {"cosine", "wsd"}
    assert set(DECAY_SHAPES) == set(schedule.DECAY_SHAPES)


@pytest.mark.parametrize(
    "kw", [{}, dict(steps=110, lr=1.0, warmup_steps=10), dict(steps=7, warmup_steps=0), dict(steps=3, warmup_steps=5)]
)
def test_default_schedule_is_todays_cosine_bit_for_bit(kw) -> None:
    cfg = TrainConfig(**kw)
    assert cfg.schedule == "cosine"
    for step in range(cfg.steps + 2):
        assert optim.lr_at(step, cfg) == lr_at(step, cfg) == _old_cosine(step, cfg)
    assert decay_start(cfg) == cfg.warmup_steps


def test_wsd_warms_up_holds_then_decays_to_the_floor_at_the_last_step() -> None:
    cfg = _wsd()
    lrs = lr_sequence(cfg)
    assert len(lrs) == 100 and decay_steps(cfg) == 20 and decay_start(cfg) == 80
    assert lrs[:10] == [(s + 1) / 10 for s in range(10)]  # the same linear warmup as cosine
    assert lrs[10:80] == [1.0] * 70  # stable: exactly lr
    assert lrs[80] == pytest.approx(0.1 + 0.9 * (1 - 1 / 20))  # the first decay step is already lower
    assert lrs[89] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[99] == pytest.approx(0.1)  # the floor, reached at step steps - 1
    assert all(a > b for a, b in itertools.pairwise(lrs[79:]))  # strictly decreasing through the decay


@pytest.mark.parametrize(
    "shape, f",
    [
        ("linear", lambda p: 1 - p),
        ("sqrt", lambda p: 1 - math.sqrt(p)),  # Hägele et al. 2024: 1 - sqrt(progress)
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
    ],
)
def test_wsd_decay_shapes(shape, f) -> None:
    cfg = _wsd(decay_shape=shape, min_lr_ratio=0.2, lr=2.0)
    for i in range(20):  # decay step i has progress (i + 1) / 20
        assert lr_at(80 + i, cfg) == pytest.approx(0.4 + 1.6 * f((i + 1) / 20))
    assert lr_at(99, cfg) == pytest.approx(0.4)


def test_wsd_decay_length_rounds_and_is_at_least_one_step() -> None:
    assert decay_steps(_wsd(steps=10, warmup_steps=0, decay_fraction=0.01)) == 1
    one = _wsd(steps=10, warmup_steps=0, decay_fraction=0.01)
    assert lr_sequence(one) == [1.0] * 9 + [pytest.approx(0.1)]
    assert decay_steps(_wsd(steps=12, warmup_steps=0, decay_fraction=0.25)) == 3
    whole = _wsd(steps=10, warmup_steps=0, decay_fraction=1.0)
    assert decay_start(whole) == 0 and lr_at(0, whole) == pytest.approx(0.1 + 0.9 * 0.9)


def test_shorter_wsd_budgets_follow_a_longer_run_until_their_decay_and_cosine_does_not() -> None:
    long = _wsd(steps=200)
    for steps in (20, 37, 50, 100, 199):
        short = _wsd(steps=steps)
        at = decay_start(short)
        assert at >= short.warmup_steps
        assert lr_sequence(short)[:at] == lr_sequence(long)[:at]
        assert lr_at(at, short) < lr_at(at, long)  # the branch's own decay starts there
    cos_long, cos_short = TrainConfig(steps=200, warmup_steps=10), TrainConfig(steps=50, warmup_steps=10)
    assert lr_at(11, cos_short) != lr_at(11, cos_long)  # cosine depends on the budget right after warmup


def test_config_checks_schedule_fields() -> None:
    with pytest.raises(ConfigError, match=r"train\.schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ConfigError, match=r"train\.decay_shape"):
        TrainConfig(decay_shape="step")
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"train\.decay_fraction"):
            TrainConfig(decay_fraction=bad)
    with pytest.raises(ConfigError, match="must not overlap"):
        TrainConfig(schedule="wsd", steps=10, warmup_steps=9, decay_fraction=0.2)
    TrainConfig(schedule="wsd", steps=10, warmup_steps=8, decay_fraction=0.2)  # 8 + 2 fits
    TrainConfig(steps=10, warmup_steps=9, decay_fraction=0.2)  # cosine ignores the WSD fields

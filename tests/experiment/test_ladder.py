"""Budget ladders: WSD cooldown branches equal independent runs, mid-schedule points are refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from moelab.config import DataConfig, RunConfig, TrainConfig
from moelab.errors import UserError
from moelab.experiment.ladder import (
    BudgetPoint,
    MidScheduleError,
    branch_points,
    budget_record,
    ladder_budgets,
    run_ladder,
)
from moelab.experiment.run import prepare
from moelab.train.logging import read_metrics
from moelab.train.schedule import decay_start, lr_sequence

from helpers import tiny_config, tiny_moe

BUDGETS = [5, 8, 12]  # decay_fraction 0.25: branches at steps 4 and 6 of the 12-step trunk


def _cfg(schedule: str = "wsd") -> RunConfig:
    return RunConfig(
        name="ladder",
        model=tiny_config(moe=tiny_moe()),
        data=DataConfig(corpus="synthetic", tokenizer="bytes", seq_len=32, synthetic_docs=8),
        train=TrainConfig(
            steps=12, batch_size=2, warmup_steps=2, schedule=schedule, decay_fraction=0.25, eval_every=4,
            eval_batches=1, log_every=1, precision="fp32", progress=False,
        ),
    )


@pytest.fixture(scope="module")
def data():
    return prepare(_cfg())[1]


@pytest.fixture(scope="module")
def ladders(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("ladder")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention on a shared machine
    try:
        branch = run_ladder(_cfg(), BUDGETS, out, data=data, mode="branch")
        independent = run_ladder(_cfg(), BUDGETS, out, data=data, mode="independent")
    finally:
        torch.set_num_threads(threads)
    return out, branch, independent


def _train_records(run_dir) -> list[dict]:
    timing = {"tokens_per_s", "train_time_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_a_branch_follows_the_lr_of_an_independent_run_and_ends_at_the_same_loss(ladders) -> None:
    out, branch, independent = ladders
    assert [p.steps for p in branch] == [p.steps for p in independent] == BUDGETS
    assert [p.source for p in branch] == ["branch", "branch", "independent"]  # the trunk is a complete run
    for b, ind in zip(branch, independent):
        cfg = replace(_cfg(), train=replace(_cfg().train, steps=b.steps))
        at = decay_start(cfg.train)
        if b.source == "branch":
            origin = json.loads((out / "branch" / f"steps_{b.steps:06d}" / "branch.json").read_text())
            assert origin["branch_step"] == at and origin["trunk"].endswith("steps_000012")
        rb, ri = _train_records(b.run_dir), _train_records(ind.run_dir)
        lrs = [r["lr"] for r in rb]  # trunk steps before the branch point, then the branch's own
        assert lrs == [r["lr"] for r in ri] == lr_sequence(cfg.train)
        assert lrs[at - 1] == cfg.train.lr and lrs[-1] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
        assert rb == ri  # every step's loss, gradient norm and routing statistics, bit for bit
        assert b.val_loss == ind.val_loss  # bitwise: CPU, fp32
        assert b.loss_by == ind.loss_by and b.tokens == ind.tokens and b.flops == ind.flops > 0


def test_branches_differ_from_the_trunk_read_mid_schedule(ladders) -> None:
    out, branch, _ = ladders
    trunk = read_metrics(out / "branch" / "steps_000012")
    mid = [r for r in trunk if r["kind"] == "eval" and r["step"] == 8]
    assert mid and mid[0]["schedule_steps"] == 12
    with pytest.raises(MidScheduleError, match="mid-schedule"):
        budget_record(trunk, 8)
    assert branch[1].steps == 8 and branch[1].val_loss != mid[0]["val_loss"]  # the decay changed the loss
    assert budget_record(trunk, 12)["val_loss"] == branch[-1].val_loss


def test_ladder_json_records_every_point(ladders) -> None:
    out, branch, _ = ladders
    summary = json.loads((out / "branch" / "ladder.json").read_text())
    assert summary["budgets"] == BUDGETS and summary["branch_steps"] == {"5": 4, "8": 6}
    assert [BudgetPoint(**p) for p in summary["points"]] == branch


def test_budget_record_refuses_mid_schedule_and_unrecorded_points() -> None:
    rec = {"kind": "eval", "step": 50, "val_loss": 2.0, "schedule_steps": 50}
    assert budget_record([{"kind": "train", "step": 50}, rec], 50) is rec
    with pytest.raises(MidScheduleError, match=r"ends at step 200.*train\.steps=50.*branch"):
        budget_record([{**rec, "schedule_steps": 200}], 50)
    with pytest.raises(MidScheduleError, match="schedule_steps"):
        budget_record([{k: v for k, v in rec.items() if k != "schedule_steps"}], 50)
    with pytest.raises(MidScheduleError, match="no evaluation at step 40"):
        budget_record([rec], 40)
    assert issubclass(MidScheduleError, UserError)


def test_ladder_refuses_existing_folders_and_cosine_branches(tmp_path, data) -> None:
    mine = tmp_path / "branch" / "steps_000008"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        run_ladder(_cfg(), BUDGETS, tmp_path, data=data, mode="branch")
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "branch").iterdir()) == ["steps_000008"]  # nothing else started
    with pytest.raises(UserError, match=r"train\.schedule='wsd'"):
        run_ladder(_cfg("cosine"), BUDGETS, tmp_path / "cos", data=data, mode="branch")
    with pytest.raises(UserError, match="budget of 2 steps"):  # warmup 2 + a decay of 1 step do not fit in 2
        run_ladder(_cfg(), [2, 12], tmp_path / "short", data=data, mode="branch")
    assert not (tmp_path / "cos").exists() and not (tmp_path / "short").exists()


def test_branch_points_group_budgets_that_branch_at_the_same_step() -> None:
    cfg = replace(_cfg(), train=replace(_cfg().train, decay_fraction=0.2, warmup_steps=0))
    assert branch_points(cfg, [7, 8, 20]) == {6: [7, 8]}  # 7 - round(1.4) == 8 - round(1.6) == 6


def test_ladder_budgets_are_geometric_unique_and_exactly_n() -> None:
    assert ladder_budgets(1000, 4) == [125, 250, 500, 1000]
    assert ladder_budgets(1000, 3, min_steps=10) == [10, 100, 1000]
    assert ladder_budgets(10, 8, min_steps=1) == [1, 2, 3, 4, 5, 6, 7, 10]
    assert ladder_budgets(50, 1) == [50]
    with pytest.raises(UserError, match="not 5 distinct"):
        ladder_budgets(4, 5, min_steps=1)
    with pytest.raises(UserError):
        ladder_budgets(100, 2, min_steps=200)


def test_ladders_of_several_seeds_side_by_side_equal_one_seed_alone(tmp_path, data, ladders) -> None:
    """run_ladders: one ladder per seed (seed 0 equals the module's ladder of the same config), two at a time."""
    from moelab.experiment.ladder import run_ladders

    _, branch, _ = ladders
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two workers of one thread each, as the module's ladder ran
    try:
        by_seed = run_ladders(_cfg(), BUDGETS, [0, 1], tmp_path, data, jobs=2)
    finally:
        torch.set_num_threads(threads)
    assert sorted(by_seed) == [0, 1] and all(p.seed == s for s, pts in by_seed.items() for p in pts)
    assert [p.val_loss for p in by_seed[0]] == [p.val_loss for p in branch]
    assert [p.val_loss for p in by_seed[1]] != [p.val_loss for p in branch]
    assert (tmp_path / "seed1" / "branch" / "ladder.json").is_file()

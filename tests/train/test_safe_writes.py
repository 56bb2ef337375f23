"""`moelab train` loses nothing: a second run into one folder, a changed config on resume, keep-last,
NaN weights and NaN gradient norms (issue 25)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moelab.checkpoint.folder import checkpoint_name, list_checkpoints, prune_checkpoints
from moelab.checkpoint.state import save_checkpoint
from moelab.cli import main
from moelab.config import DataConfig, RunConfig, TrainConfig
from moelab.convert.load import load_model
from moelab.data.prepare import prepare_data
from moelab.data.tokenizer import BytesTokenizer
from moelab.errors import UserError
from moelab.model.transformer import Transformer
from moelab.train.logging import read_metrics
from moelab.train.run_folder import check_run_folder, start_run_folder
from moelab.train.trainer import Trainer, TrainingDiverged

from helpers import error_line, snapshot, tiny_config, tiny_moe

FAST = ["--preset", "smoke", "--set", "data.corpus=synthetic", "--set", "data.synthetic_docs=6", "--no-progress"]


def steps(n: int) -> list[str]:
    return ["--set", f"train.steps={n}", "--set", "train.eval_every=0", "--set", "train.log_every=1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))




def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run) if r["kind"] == "train"]


def test_training_twice_into_one_folder_is_refused_and_loses_nothing(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *FAST, *steps(4), "--out", str(run)]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", *FAST, *steps(4), "--out", str(run)]) == 2
    line = error_line(capsys)
    assert "already exists and is not empty" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(run) == before  # metrics.jsonl not truncated, checkpoints untouched


def test_overwrite_starts_again_and_keeps_its_own_checkpoint(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *FAST, *steps(6), "--out", str(run)]) == 0
    (run / "notes.txt").write_text("my notes")
    before = snapshot(run)
    assert main(["train", *FAST, *steps(2), "--out", str(run), "--overwrite"]) == 2
    assert "holds notes.txt, which moelab did not write" in error_line(capsys)
    assert snapshot(run) == before
    (run / "notes.txt").unlink()
    assert main(["train", *FAST, *steps(2), "--out", str(run), "--overwrite"]) == 0
    # the earlier run's later steps are gone with it: keep-last did not delete the new step 2
    assert [p.name for p in list_checkpoints(run)] == [checkpoint_name(2)]
    assert train_steps(run) == [1, 2]
    load_model(run)


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path) -> None:
    cfg = RunConfig(model=tiny_config(vocab_size=259), data=DataConfig(seq_len=32))
    model = Transformer(cfg.model)
    root = tmp_path / "checkpoints"
    for step in (5, 6, 2):
        save_checkpoint(root / checkpoint_name(step), model, cfg, BytesTokenizer(), train_state={"step": step})
    prune_checkpoints(tmp_path, keep_last=1, newest=root / checkpoint_name(2))
    assert sorted(p.name for p in root.iterdir()) == [checkpoint_name(s) for s in (2, 5, 6)]
    prune_checkpoints(tmp_path, keep_last=1, newest=root / checkpoint_name(6))
    assert sorted(p.name for p in root.iterdir()) == [checkpoint_name(6)]


def test_resume_with_changed_steps_or_lr_names_the_fields(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *FAST, *steps(4), "--out", str(run), "--stop-after", "2"]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", *FAST, *steps(6), "--out", str(run), "--resume"]) == 2
    line = error_line(capsys)
    assert "train.steps 4 -> 6" in line and "--allow-config-change" in line
    assert main(["train", *FAST, *steps(4), "--set", "train.lr=0.5", "--out", str(run), "--resume"]) == 2
    line = error_line(capsys)
    assert "train.lr" in line and "-> 0.5" in line and "train.steps" not in line
    # the model's shape can never change, not even when asked
    argv = ["train", *FAST, *steps(4), "--set", "model.n_layers=3", "--out", str(run), "--resume", "--allow-config-change"]
    assert main(argv) == 2
    assert "model.n_layers 2 -> 3" in (line := error_line(capsys)) and "cannot change" in line
    assert snapshot(run) == before
    assert main(["train", *FAST, *steps(6), "--out", str(run), "--resume", "--allow-config-change"]) == 0
    assert "resumed with a changed config: train.steps 4 -> 6\n" in capsys.readouterr().out
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_folder_with_nothing_to_resume_and_both_flags(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    assert main(["train", *FAST, *steps(2), "--out", str(run), "--resume"]) == 2
    assert "no complete checkpoint to continue from" in error_line(capsys)
    assert main(["train", *FAST, *steps(2), "--out", str(run), "--resume", "--overwrite"]) == 2
    assert "exclude each other" in error_line(capsys)
    assert main(["train", *FAST, *steps(2), "--out", str(run), "--allow-config-change"]) == 2
    assert "--resume only" in error_line(capsys)
    assert (run / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1}\n'
    assert main(["train", *FAST, *steps(2), "--out", str(tmp_path / "fresh"), "--resume"]) == 0  # nothing there yet


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensor(tmp_path, capsys) -> None:
    data = DataConfig(corpus="synthetic", tokenizer="bytes", seq_len=32, synthetic_docs=4)
    cfg = RunConfig(model=tiny_config(vocab_size=259, max_seq_len=64), data=data)
    model = Transformer(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, cfg, BytesTokenizer())
    assert main(["eval", str(ckpt)]) == 2
    line = error_line(capsys)
    assert "'embed.weight'" in line and "NaN" in line and "earlier checkpoint" in line


def _trainer(run_dir: Path, **train) -> Trainer:
    cfg = RunConfig(
        name="t",
        model=tiny_config(moe=tiny_moe()),
        data=DataConfig(corpus="synthetic", tokenizer="bytes", seq_len=32, synthetic_docs=8),
        train=TrainConfig(steps=6, batch_size=4, warmup_steps=2, eval_every=0, eval_batches=1, log_every=1,
                          progress=False, **train),
    )  # fmt: skip
    return Trainer(cfg, run_dir, data=prepare_data(cfg)[1])


def test_a_nan_gradient_norm_is_named_with_its_steps(tmp_path) -> None:
    trainer = _trainer(tmp_path / "run", max_bad_steps=2)
    trainer.model.embed.weight.register_hook(lambda g: torch.full_like(g, float("nan")))  # finite loss, NaN grads
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    message = str(err.value)
    assert "the gradient norm was not finite for 2 steps in a row (steps 1, 2;" in message
    assert "loss" not in message.split(":")[0]
    recs = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["skipped"] for r in recs] == [True, True] and all(r["loss"] == r["loss"] for r in recs)  # loss finite


def test_a_trainer_that_goes_on_appends_to_its_log(tmp_path) -> None:
    trainer = _trainer(tmp_path / "run")
    trainer.train(stop_at=2)
    trainer.train(stop_at=4)  # the same trainer, later: its own folder, so not refused, and the log continues
    assert train_steps(tmp_path / "run") == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_overwrite_recognises_only_complete_checkpoints_and_its_own_files(tmp_path) -> None:
    cfg = RunConfig(model=tiny_config(vocab_size=259), data=DataConfig(seq_len=32))
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / checkpoint_name(3), Transformer(cfg.model), cfg, BytesTokenizer())
    (run / "checkpoints" / ".tmp-step_00000004-1").mkdir()  # a save cut short
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "checkpoints" / checkpoint_name(9)).mkdir()  # no completion marker: not moelab's to delete
    with pytest.raises(UserError, match="holds checkpoints/step_00000009, which moelab did not write"):
        check_run_folder(run, overwrite=True)
    (run / "checkpoints" / checkpoint_name(9)).rmdir()
    (run / "checkpoints" / checkpoint_name(3) / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"step_00000003/notes\.txt"):
        check_run_folder(run, overwrite=True)
    (run / "checkpoints" / checkpoint_name(3) / "notes.txt").unlink()
    start_run_folder(run, overwrite=True)
    assert list(run.iterdir()) == []

"""`moelab study` loses nothing (issue 25): a second run into one OUT/NAME is refused before any data
is prepared, naming --overwrite (study has no --resume); --overwrite deletes only the earlier study's
own runs; the committed page is replaced file by file in one step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import moelab.experiment.run
from moelab.checkpoint.folder import checkpoint_name
from moelab.checkpoint.state import save_checkpoint
from moelab.cli import main
from moelab.config import DataConfig, RunConfig
from moelab.data.tokenizer import BytesTokenizer
from moelab.errors import UserError
from moelab.model.transformer import Transformer
from moelab.studies.folder import STUDY_FOLDER, claim_study_folder
from moelab.studies.page import write_study
from moelab.studies.result import StudyResult

from helpers import error_line, snapshot, tiny_config

STUDY = ["study", "placement", "--budget", "smoke", "--seeds", "2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")




def test_a_second_run_is_refused_before_any_data_work_and_overwrite_replaces_only_its_own(
    tmp_path, capsys, monkeypatch
) -> None:
    out, docs = tmp_path / "runs", tmp_path / "docs"
    argv = [*STUDY, "--out", str(out), "--docs", str(docs)]
    assert main(argv) == 0
    study = out / "placement"
    before, page = snapshot(study), snapshot(docs)
    capsys.readouterr()

    with monkeypatch.context() as m:
        m.setattr(
            moelab.experiment.run, "prepare", lambda *a, **k: pytest.fail("prepared data before refusing")
        )
        assert main(argv) == 2
        line = error_line(capsys)
        assert "already exists and is not empty" in line and "--overwrite" in line and "--resume" not in line
        (study / "all" / "notes.txt").write_text("mine")
        assert main([*argv, "--overwrite"]) == 2
        assert "holds all/notes.txt, which moelab did not write" in error_line(capsys)
    (study / "all" / "notes.txt").unlink()
    assert snapshot(study) == before and snapshot(docs) == page  # neither runs nor page touched

    shutil.copytree(
        study / "all" / "seed0", study / "retired_arm" / "seed0"
    )  # an arm the new run does not have
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in study.iterdir()) == ["all", "every_other", "first_dense", "last_half"]
    assert not any(p.name.startswith(".tmp-") for p in docs.iterdir())
    assert main([*argv, "--overwrite", "--rescore"]) == 2
    assert "--rescore trains nothing" in error_line(capsys)


def _run_folder(path: Path, step: int) -> None:
    cfg = RunConfig(model=tiny_config(vocab_size=259), data=DataConfig(seq_len=32))
    save_checkpoint(
        path / "checkpoints" / checkpoint_name(step), Transformer(cfg.model), cfg, BytesTokenizer()
    )
    (path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')


def test_the_study_folder_recognises_runs_ladders_figure_and_temporaries(tmp_path) -> None:
    study = tmp_path / "iso-flop"
    _run_folder(study / "moe" / "E4" / "seed0", 2)
    ladder = study / "dense_ladder" / "seed0" / "branch"
    _run_folder(ladder / "steps_000004", 4)
    (ladder / "steps_000004" / "branch.json").write_text("{}")
    (ladder / "ladder.json").write_text("{}")
    (study / "iso-flop.png").write_bytes(b"png")
    (study / ".tmp-stores-abc-123").mkdir()
    assert claim_study_folder(study, overwrite=True) == study
    assert list(study.iterdir()) == []

    _run_folder(study / "moe" / "E4" / "seed0", 2)
    for foreign in ("other.png", "moe/E4/seed0/checkpoints/step_00000009", "moe/E4/seed0/notes.md"):
        path = study / foreign
        if path.suffix:
            path.write_text("mine")
        else:
            path.mkdir(parents=True)
        with pytest.raises(UserError, match=foreign.replace(".", r"\.")):
            claim_study_folder(study, overwrite=True)
        assert path.exists()
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    assert STUDY_FOLDER.foreign(study / "moe") is None


def test_the_page_is_replaced_whole_or_not_at_all(tmp_path) -> None:
    arms = {"a": {"mean": {"val_loss": 1.0}, "std": {"val_loss": 0.1}, "per_seed": {"val_loss": [1.0, 1.0]}}}
    res = StudyResult("placement", "claim", "method", "smoke", [0, 1], "data", arms, "inconclusive", "reason")
    write_study(res, tmp_path)
    page = snapshot(tmp_path)
    res.verdict_reason = "a reason that cannot be written \ud800"  # fails while the page is being written
    with pytest.raises(UnicodeEncodeError):
        write_study(res, tmp_path)
    assert snapshot(tmp_path)["placement.md"] == page["placement.md"]  # not truncated
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())

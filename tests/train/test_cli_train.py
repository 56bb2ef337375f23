"""`moelab train`, `moelab eval`, `moelab compare`: end to end, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moelab.cli import main

SRC = str(Path(__file__).resolve().parents[2] / "src")
FAST = ["--preset", "smoke", "--set", "data.corpus=synthetic", "--set", "data.synthetic_docs=6", "--no-progress"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))


def test_train_stop_resume_and_eval(tmp_path, capsys) -> None:
    run = str(tmp_path / "run")
    steps = ["--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.log_every=1"]
    assert main(["train", *FAST, *steps, "--out", run, "--stop-after", "2"]) == 0
    assert main(["train", *FAST, *steps, "--out", run, "--resume"]) == 0
    recs = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert main(["eval", run, "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    assert math.isfinite(result["loss"]) and "domain" in result["loss_by"]
    assert result["checkpoint"].endswith("step_00000004")
    final = [r for r in recs if r["kind"] == "eval"][-1]
    assert result["loss"] == pytest.approx(final["val_loss"], rel=1e-6)  # the run's own validation blocks
    assert result["split"] == "validation" and result["documents"] == result["documents_in_corpus"] > 0
    assert result["tokens"] > 0 and result["bytes"] > 0 and set(result["bpb_by"]["domain"]) == set(result["loss_by"]["domain"])
    assert result["bpb"] == pytest.approx(result["loss"] * result["tokens"] / (math.log(2) * result["bytes"]))
    text = tmp_path / "other.txt"
    text.write_text("sort: 3 1 2 -> 1 2 3\n" * 40)
    assert main(["eval", run, "--data", str(text)]) == 0
    out = capsys.readouterr().out
    assert "(every document)" in out and "documents 1 of 1" in out and "loss" in out and "bpb" in out


def _write_bad_inputs(tmp: Path) -> dict[str, Path]:
    (tmp / "empty").mkdir()
    (tmp / "garbage").mkdir()
    (tmp / "garbage" / "a.txt").write_bytes(bytes(range(256)) * 4)
    (tmp / "latin").mkdir()
    (tmp / "latin" / "a.txt").write_bytes("déjà vu".encode("latin-1"))
    (tmp / "notext.jsonl").write_text('{"body": "x"}\n')
    return {"empty": tmp / "empty", "garbage": tmp / "garbage", "latin": tmp / "latin", "notext": tmp / "notext.jsonl"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--set", "train.bogus=1"], "unknown key 'train.bogus'"),
        (["train", "--set", "moe.bogus=1"], "unknown key 'model.moe.bogus'"),
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["compare", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--set", "train.precision=fp8"], "train.precision='fp8' is invalid"),
        (["train", "--set", "data.corpus=/nonexistent/corpus.txt"], "does not exist"),
        (["train", "--set", "data.corpus={empty}"], "holds no text"),
        (["train", "--set", "data.corpus={garbage}"], "holds no text"),
        (["train", "--set", "data.corpus={latin}"], "holds no text"),
        (["train", "--set", "data.corpus={notext}"], "needs a 'text' field"),
        (["compare", "--set", "moe=null"], "compare needs an MoE model"),
        (["eval", "/nonexistent/run"], "does not exist"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, argv, message) -> None:
    paths = _write_bad_inputs(tmp_path)
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]
    assert main([*argv, "--preset", "smoke"] if "--preset" not in argv and argv[0] != "eval" else argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("moelab: warning:")]
    assert len(lines) == 1 and message in lines[0], err
    if "garbage" in "".join(argv) or "latin" in "".join(argv):
        assert "moelab: warning:" in err and "skipped 1" in err  # counted skip, then the error


def test_subprocess_error_has_no_traceback(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "moelab", "train", "--set", "data.corpus=/nonexistent.jsonl"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["moelab train: error: corpus path '/nonexistent.jsonl' does not exist "
                                                "(give a .txt/.jsonl file, a folder, or a name)"]

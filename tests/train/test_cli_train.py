"""`moelab train`, `moelab eval`, `moelab compare`: end to end, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
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
    text = tmp_path / "other.txt"
    text.write_text("sort: 3 1 2 -> 1 2 3\n" * 40)
    assert main(["eval", run, "--data", str(text)]) == 0
    assert "loss" in capsys.readouterr().out


def test_compare_smoke_writes_report_and_summary(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    assert "dense_iso_active" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    models = summary["models"]
    assert set(models) == {"moe", "dense_iso_active"}
    for m in models.values():
        assert math.isfinite(m["final_val_loss"]) and m["final_val_loss"] > 0
        assert m["tokens"] == models["moe"]["tokens"] > 0  # same token budget
        h = m["history"]
        assert h["val_loss"][-1] < h["val_loss"][0] or h["loss"][-1] < h["loss"][0]
        assert h["loss"][-1] < math.log(summary["data"]["vocab_size"])  # learned something beyond uniform
        assert m["tokens_per_s"] > 0 and m["train_flops"] > 0
        assert m["flops_formula"] == "calc"  # the formula studies and `moelab calc` use
        assert set(m["val_loss_by_domain"]) >= {"code", "prose", "arithmetic"}
    assert models["moe"]["params_total"] > models["dense_iso_active"]["params_total"]
    assert models["moe"]["params_active"] - models["dense_iso_active"]["params_active"] < 1000  # router only
    assert len(models["moe"]["expert_load"]) == 2 and not models["dense_iso_active"]["expert_load"]
    from moelab.calc import arch_from_config, flops_per_token
    from moelab.config import ModelConfig, from_dict

    moe_cfg = from_dict(ModelConfig, summary["config"]["model"])
    moe_cfg = replace(moe_cfg, vocab_size=summary["data"]["vocab_size"])
    want = flops_per_token(arch_from_config(moe_cfg), summary["config"]["data"]["seq_len"])["training"]
    assert models["moe"]["train_flops"] == pytest.approx(want * models["moe"]["tokens"])
    assert summary["verdict"]["moe_minus_dense_iso_active"] == pytest.approx(
        models["moe"]["final_val_loss"] - models["dense_iso_active"]["final_val_loss"]
    )
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 + 3  # compare's four plots + analysis plots, embedded
    assert "Routing analysis of the MoE" in html and "analysis/report.html" in html
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    assert set(analysis["specialization"]) == set(summary["analysis"]["specialization"])
    assert (out / "analysis" / "report.html").is_file()
    assert 'src="http' not in html and "dense_iso_active" in html
    assert f"{models['moe']['final_val_loss']:.4f}" in html


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

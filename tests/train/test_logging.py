"""Metrics log: JSONL records, NaN-safe, truncated to the resumed step; TensorBoard optional."""

from __future__ import annotations

import importlib.util
import json

import pytest

from moelab.errors import UserError
from moelab.train.logging import MetricsLogger, read_metrics


def test_jsonl_records_and_resume_truncation(tmp_path) -> None:
    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        log.log({"kind": "train", "step": step, "loss": float("nan") if step == 2 else 1.0 / step})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert json.loads(lines[1])["loss"] == "nan"  # strict JSON: no bare NaN
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line cut by a crash
    MetricsLogger(tmp_path, resume_step=2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    MetricsLogger(tmp_path)  # a fresh run starts a fresh log
    assert read_metrics(tmp_path) == []


def test_tensorboard_is_optional(tmp_path) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(UserError, match=r"pip install 'moelab\[tb\]'"):
            MetricsLogger(tmp_path, tensorboard=True)
    else:
        log = MetricsLogger(tmp_path, tensorboard=True)
        log.log({"kind": "train", "step": 1, "loss": 2.0})
        log.close()
        assert list((tmp_path / "tb").glob("events.*"))

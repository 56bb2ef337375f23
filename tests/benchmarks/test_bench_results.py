"""`moelab bench` and `moelab bench-decode` never replace an earlier result (issue 25): bench's
time-named results get a fresh name on a same-minute rerun; bench-decode's fixed names are refused
before anything is timed unless --overwrite, which replaces only its own files; the model exported
for transformers is exported once, never over a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moelab.bench_decode as bench_decode
import moelab.benchmarks.runner as runner
import moelab.convert.hf as hf
from moelab.bench_decode import DecodeBenchResult, Row, run_decode_bench, write_results
from moelab.benchmarks.report import write_report
from moelab.cli import main
from moelab.errors import UserError
from moelab.model.transformer import Transformer
from moelab.model.twins import dense_twin

from helpers import one_line, tiny_config, tiny_moe

RESULT = {"machine": {"device": "cpu", "torch": "2", "threads": 1}, "date": "2030-01-01", "matmul_gflops": {},
          "layer": []}  # fmt: skip



def _result(decode: float = 10.0) -> DecodeBenchResult:
    return DecodeBenchResult(
        prompt=4, new_tokens=2, rows=[Row("moe", "moelab", "bf16", 1, 100.0, decode, 1.0, 1.0)]
    )


def test_a_same_minute_bench_rerun_gets_a_fresh_name(tmp_path) -> None:
    first = write_report(RESULT, tmp_path, "bench-20300101-1200", "moelab bench")
    before = {p: p.read_bytes() for p in first}
    second = write_report(RESULT, tmp_path, "bench-20300101-1200", "moelab bench --quick")
    assert [p.name for p in second] == ["bench-20300101-1200-2.json", "bench-20300101-1200-2.md"]
    assert {p: p.read_bytes() for p in first} == before  # the first run's record is intact
    assert json.loads(second[0].read_text())["command"] == "moelab bench --quick"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (*first, *second)
    )  # no temporary


def test_bench_refuses_a_file_as_out_before_measuring(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(runner, "run_bench", lambda *a, **k: pytest.fail("measured before refusing"))
    (tmp_path / "results").write_text("not a folder")
    assert main(["bench", "--quick", "--no-hf", "--no-model", "--out", str(tmp_path / "results")]) == 2
    assert "is a file, not a folder" in one_line(capsys)


@pytest.fixture
def no_timing(monkeypatch):
    """bench-decode on a tiny default model, its timing replaced by a canned result (or a failure)."""
    monkeypatch.setattr(bench_decode, "mixtral_shaped", lambda: tiny_config(moe=tiny_moe()))
    monkeypatch.setattr(bench_decode, "run_decode_bench", lambda *a, **k: _result(decode=20.0))


def test_bench_decode_refuses_an_earlier_result_before_timing(
    tmp_path, capsys, monkeypatch, no_timing
) -> None:
    js, md = write_results(_result(), tmp_path, stem="decode-quick")
    before = (js.read_bytes(), md.read_bytes())
    monkeypatch.setattr(
        bench_decode, "run_decode_bench", lambda *a, **k: pytest.fail("timed before refusing")
    )
    assert main(["bench-decode", "--quick", "--out", str(tmp_path)]) == 2
    line = one_line(capsys)
    assert "decode-quick.json already exists" in line and "--overwrite" in line
    assert (js.read_bytes(), md.read_bytes()) == before


def test_bench_decode_overwrite_replaces_only_its_own_results(tmp_path, capsys, no_timing) -> None:
    js, md = write_results(_result(), tmp_path, stem="decode-quick")
    md.write_text("my notes on the last run")  # no longer the table bench-decode wrote
    assert main(["bench-decode", "--quick", "--out", str(tmp_path), "--overwrite"]) == 2
    assert "decode-quick.md is not a bench-decode result" in one_line(capsys)
    with pytest.raises(UserError, match="not a bench-decode result"):
        write_results(_result(), tmp_path, stem="decode-quick", overwrite=True)  # the library call too
    assert md.read_text() == "my notes on the last run"
    md.unlink()
    assert main(["bench-decode", "--quick", "--out", str(tmp_path), "--overwrite"]) == 0
    assert json.loads(js.read_text())["rows"][0]["decode_tok_s"] == 20.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode-quick.json", "decode-quick.md"]
    with pytest.raises(UserError, match="is a file"):
        write_results(_result(), js)


def test_bench_decode_exports_each_model_once_and_never_over_a_folder(monkeypatch) -> None:
    calls: list[tuple[Path, bool]] = []
    real = hf.export_hf

    def export(model, path, family=None, overwrite=True):
        calls.append((Path(path), overwrite))
        return real(model, path, family=family, overwrite=overwrite)

    monkeypatch.setattr(hf, "export_hf", export)
    torch.manual_seed(0)
    cfg = tiny_config(d_model=64, moe=tiny_moe(expert_hidden=64))
    moe, dense = Transformer(cfg).eval(), Transformer(dense_twin(cfg, "iso_active")).eval()
    res = run_decode_bench(moe, dense, dtypes=("bf16",), batches=(1,), prompt=2, new=1, rounds=1,
                           hf_dtypes=("fp32", "bf16"), log=lambda _: None)  # fmt: skip
    assert {(r.model, r.dtype) for r in res.rows if r.impl == "transformers"} == {
        (m, d) for m in ("moe", "dense") for d in ("fp32", "bf16")
    }
    assert [p.name for p, _ in calls] == ["moe", "dense"] and not any(overwrite for _, overwrite in calls)

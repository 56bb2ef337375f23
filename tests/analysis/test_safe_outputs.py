"""`moelab analyze` loses nothing (issue 25): an existing --out is refused before any work unless
--overwrite, and then only an earlier analysis is replaced; never inside its checkpoint; the folder
appears whole or not at all; a trace never deletes a folder it did not write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cases import small_config, synthetic_data

import moelab.analysis.report as report
from moelab.analysis.trace import TraceWriter
from moelab.checkpoint.folder import checkpoint_name
from moelab.checkpoint.state import save_checkpoint
from moelab.cli import main
from moelab.config import DataConfig, MoEConfig, RunConfig
from moelab.errors import UserError
from moelab.model.transformer import Transformer

from helpers import one_line, snapshot

SMALL = [
    "--data",
    "synthetic",
    "--max-tokens",
    "256",
    "--drop-tokens",
    "64",
    "--batch-size",
    "4",
    "--no-progress",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("safe-analyze")
    torch.manual_seed(0)
    _, tok = synthetic_data(2)
    cfg = small_config(MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    run = RunConfig(model=cfg, data=DataConfig(corpus="synthetic", tokenizer="bytes", seq_len=32))
    return save_checkpoint(tmp / "run" / "checkpoints" / checkpoint_name(1), Transformer(cfg), run, tok)




def test_a_second_analysis_is_refused_before_loading_and_overwrite_replaces_only_its_own(
    ckpt, tmp_path, capsys, monkeypatch
) -> None:
    out = tmp_path / "analysis"
    assert main(["analyze", str(ckpt), *SMALL, "--out", str(out)]) == 0
    assert {"analysis.json", "report.html", "trace", "trace_step0"} <= {p.name for p in out.iterdir()}
    before = snapshot(out)

    import moelab.convert.load

    with monkeypatch.context() as m:  # the refusal comes before the checkpoint is even read
        m.setattr(
            moelab.convert.load, "load_model", lambda *a, **k: pytest.fail("loaded before refusing")
        )
        assert main(["analyze", str(ckpt), *SMALL, "--out", str(out)]) == 2
    line = one_line(capsys)
    assert "already exists and is not empty" in line and "--overwrite" in line
    assert snapshot(out) == before

    (out / "trace" / "notes.txt").write_text("mine")
    assert main(["analyze", str(ckpt), *SMALL, "--out", str(out), "--overwrite"]) == 2
    assert "holds trace/notes.txt, which moelab did not write" in one_line(capsys)
    assert (out / "trace" / "notes.txt").read_text() == "mine"
    (out / "trace" / "notes.txt").unlink()

    (out / "report.html").write_text("an earlier report")
    assert main(["analyze", str(ckpt), *SMALL, "--out", str(out), "--overwrite"]) == 0
    assert "<html" in (out / "report.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]  # no temporary left beside it


def test_an_output_inside_its_checkpoint_is_refused(ckpt, capsys) -> None:
    before = snapshot(ckpt)
    for out in (ckpt / "analysis", ckpt.parent.parent):
        assert main(["analyze", str(ckpt), *SMALL, "--out", str(out), "--overwrite"]) == 2
        line = one_line(capsys)
        assert "the source" in line and ("lies inside" in line or "holds" in line)
    assert snapshot(ckpt) == before and not (ckpt / "analysis").exists()


def test_a_failed_analysis_keeps_the_earlier_one_whole(ckpt, tmp_path, monkeypatch) -> None:
    out = tmp_path / "analysis"
    assert main(["analyze", str(ckpt), *SMALL, "--out", str(out)]) == 0
    before = snapshot(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "render_html", broken)  # after every trace and analysis.json are written
    fewer = [*SMALL, "--max-tokens", "128"]  # other traces and numbers than the analysis it would replace
    with pytest.raises(OSError, match="disk full"):
        main(["analyze", str(ckpt), *fewer, "--out", str(out), "--overwrite"])
    assert snapshot(out) == before
    with pytest.raises(OSError, match="disk full"):
        main(["analyze", str(ckpt), *SMALL, "--out", str(tmp_path / "new")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]  # neither a half folder nor a temporary


def test_a_trace_replaces_an_earlier_trace_but_never_a_foreign_folder(tmp_path) -> None:
    data, _ = synthetic_data(2)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match=r"thesis\.tex"), TraceWriter(folder):
        pytest.fail("the check comes first")
    assert (folder / "thesis.tex").read_text() == "years of work"
    with TraceWriter(tmp_path / "t", label_names=data.label_names):
        pass
    (tmp_path / "t" / "chunk_00007.safetensors").write_bytes(b"")  # an earlier, longer trace's chunk
    with TraceWriter(tmp_path / "t", label_names=data.label_names):
        pass
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["meta.json"]

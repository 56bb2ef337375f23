"""`moelab quantize` never deletes a run folder or replaces its source (issue 25)."""

from __future__ import annotations

import json
from pathlib import Path

from moelab.checkpoint.folder import checkpoint_name
from moelab.checkpoint.state import save_checkpoint
from moelab.cli import main
from moelab.config import DataConfig, RunConfig
from moelab.convert.load import load_model
from moelab.data.tokenizer import BytesTokenizer
from moelab.model.transformer import Transformer
from moelab.quant import quantization_record

from helpers import one_line, snapshot, tiny_config, tiny_moe


def _run_folder(tmp_path: Path) -> Path:
    """A run folder as training leaves it: two checkpoints and metrics.jsonl."""
    model = Transformer(tiny_config(vocab_size=259, moe=tiny_moe())).eval()
    cfg = RunConfig(model=model.cfg, data=DataConfig(seq_len=32))
    run = tmp_path / "run"
    for step in (2, 4):
        save_checkpoint(run / "checkpoints" / checkpoint_name(step), model, cfg, BytesTokenizer(), train_state={"step": step})
    (run / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(1, 5)))
    return run




def test_quantize_into_the_run_folder_is_refused_and_the_run_survives(tmp_path, capsys) -> None:
    run = _run_folder(tmp_path)
    before = snapshot(run)
    for src, where in ((run, "is the source"), (run / "checkpoints" / checkpoint_name(4), "holds the source")):
        for extra in ([], ["--overwrite"]):
            assert main(["quantize", str(src), "--bits", "8", "--out", str(run), *extra]) == 2
            assert where in one_line(capsys)
    assert main(["quantize", str(run), "--bits", "8", "--out", str(run / "q8")]) == 2
    assert "lies inside the source" in one_line(capsys)
    assert snapshot(run) == before


def test_quantize_onto_its_source_checkpoint_is_refused(tmp_path, capsys) -> None:
    run = _run_folder(tmp_path)
    ckpt = run / "checkpoints" / checkpoint_name(4)
    before = snapshot(run)
    assert main(["quantize", str(ckpt), "--bits", "8", "--out", str(ckpt), "--overwrite"]) == 2
    assert "is the source" in one_line(capsys)
    # a new step folder beside it would be resumed as the run's newest checkpoint
    assert main(["quantize", str(ckpt), "--bits", "8", "--out", str(run / "checkpoints" / checkpoint_name(9))]) == 2
    assert "lies inside the source" in one_line(capsys)
    assert snapshot(run) == before
    model, _ = load_model(ckpt)
    assert quantization_record(model) is None  # still the full-precision weights


def test_quantize_replaces_an_earlier_quantized_copy_only_with_overwrite(tmp_path, capsys) -> None:
    run = _run_folder(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", str(run), "--bits", "8", "--out", str(out)]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["quantize", str(run), "--bits", "4", "--out", str(out)]) == 2
    assert "already exists and is not empty" in (line := one_line(capsys)) and "--overwrite" in line
    assert snapshot(out) == before
    assert main(["quantize", str(run), "--bits", "4", "--out", str(out), "--overwrite"]) == 0
    model, _ = load_model(out)
    assert quantization_record(model)["bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "run"]  # no temporary left beside it

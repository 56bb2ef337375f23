"""`--objective` through `moelab train`, `eval` and `compare` (issue 14), and the trainer's objective path."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moelab.cli import main
from moelab.config import OBJECTIVE_NAMES, ConfigError, TrainConfig, run_preset
from moelab.convert.load import load_model
from moelab.model.encoder_decoder import EncoderDecoder
from moelab.objectives import OBJECTIVES
from moelab.train.trainer import Trainer

FAST = ["--preset", "smoke", "--set", "data.corpus=synthetic", "--set", "data.synthetic_docs=6", "--no-progress"]
METRIC = {"prefix": "target_loss", "mlm": "masked_accuracy", "span": "target_loss"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))


def test_config_names_are_the_registry() -> None:
    assert set(OBJECTIVE_NAMES) == set(OBJECTIVES)
    with pytest.raises(ConfigError, match=r"train\.objective"):
        TrainConfig(objective="bert")


@pytest.mark.parametrize("objective", ["mlm", "span"])
def test_compare_objective_smoke(tmp_path, capsys, objective: str) -> None:
    """compare --objective mlm|span end to end on the built-in corpus; the report names the objective and metric."""
    out = tmp_path / "cmp"
    argv = ["compare", "--preset", "smoke", "--objective", objective, "--seeds", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"objective {objective}" in printed and METRIC[objective].replace("_", " ") in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == objective and summary["metric"] == METRIC[objective]
    assert summary["data"]["corpus"] == "builtin"
    assert "analysis" not in summary and "skipped" in summary["analysis_skipped"]
    for m in summary["models"].values():
        assert math.isfinite(m["final_val_loss"]) and math.isfinite(m["final_metric"])
        assert m["final_val_metrics"]["tokens"] > 0
    html = (out / "report.html").read_text()
    assert f"<b>{objective}</b>" in html and f"<b>{METRIC[objective]}</b>" in html
    model, tok = load_model(out / "moe" / "seed0")
    assert isinstance(model, EncoderDecoder) == (objective == "span")
    if objective == "mlm":
        assert model.cfg.attention == "bidirectional" and tok.token_to_id("<|mask|>") is not None


@pytest.mark.parametrize("objective", ["prefix", "mlm", "span"])
def test_train_then_eval_round_trip(tmp_path, capsys, objective: str) -> None:
    run = str(tmp_path / "run")
    assert main(["train", *FAST, "--objective", objective, "--set", "train.steps=3", "--out", run]) == 0
    assert METRIC[objective] in capsys.readouterr().out
    recs = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
    final = [r for r in recs if r["kind"] == "eval"][-1]
    assert final["objective"] == objective and METRIC[objective] in final["val_metrics"]
    assert main(["eval", run, "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    assert result["objective"] == objective
    assert result["loss"] == pytest.approx(final["val_loss"], rel=1e-6)  # same fixed evaluation masks/spans
    assert main(["eval", run, "--objective", "causal"]) == 2
    assert "needs a different model" in capsys.readouterr().err


def test_causal_objective_is_the_original_path(tmp_path) -> None:
    """train.objective=causal feeds the loader's next-token labels straight into the decoder, as the
    trainer did before objectives existed; another objective changes what the model sees."""
    from moelab.model.transformer import Transformer
    from moelab.train import objective_step

    cfg = run_preset("smoke")
    cfg = replace(cfg, train=replace(cfg.train, steps=1, progress=False), data=replace(cfg.data, corpus="synthetic"))
    t = Trainer(cfg, tmp_path / "a")
    assert type(t.model) is Transformer and t.model.cfg.attention == "causal"
    batch = t.data.splits.train.batch(list(range(2)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        via = objective_step.forward(t.model, t.objective, batch, t.data.tokenizer, gen, t.device, False)
        direct = t.model(batch.input_ids, labels=batch.labels)
        prefix = objective_step.forward(
            t.model, OBJECTIVES["prefix"](), batch, t.data.tokenizer, gen, t.device, False
        )
    assert torch.equal(via.total_loss, direct.total_loss) and torch.equal(via.logits, direct.logits)
    assert not torch.equal(prefix.loss, direct.loss)


def test_objective_resume_is_bit_exact(tmp_path) -> None:
    """Masks drawn after a resume are the ones an uninterrupted run draws (the objective RNG is checkpointed)."""
    cfg = run_preset("smoke")
    tr = replace(cfg.train, steps=4, progress=False, objective="mlm", eval_every=0, log_every=1)
    cfg = replace(cfg, train=tr, data=replace(cfg.data, corpus="synthetic"))
    full = Trainer(cfg, tmp_path / "full")
    full.train()
    part = Trainer(cfg, tmp_path / "part")
    part.train(stop_at=2)
    resumed = Trainer(cfg, tmp_path / "part")
    resumed.train(resume=True)
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)

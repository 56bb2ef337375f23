"""LoRA fine-tuning through `moelab train --init ... --set train.lora.rank=R`: the base stays frozen, the
adapters learn, resuming keeps them, and the run's checkpoints load as the merged model."""

from __future__ import annotations

import pytest
import torch

from moelab.cli import main
from moelab.config import ConfigError, LoRAConfig, RunConfig, apply_overrides
from moelab.model.lora import apply_lora, base_state_dict
from moelab.model.transformer import Transformer
from moelab.train.checkpoint import latest_checkpoint, load_training_state, read_run_config
from moelab.train.logging import read_metrics

FAST = ["--preset", "smoke", "--set", "data.corpus=synthetic", "--set", "data.synthetic_docs=8", "--no-progress",
        "--set", "train.batch_size=4", "--set", "train.eval_batches=2"]  # fmt: skip
LORA = ["--set", "train.lora.rank=4", "--set", "train.lora.alpha=8", "--set", "train.lr=3e-2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def base(tmp_path):
    """A briefly pre-trained MoE (its embeddings and head mean something, as a released model's do)."""
    assert main(["train", *FAST, "--set", "train.steps=40", "--out", str(tmp_path / "base")]) == 0
    from moelab.train.checkpoint import load_model

    model, _ = load_model(tmp_path / "base")
    return tmp_path / "base", {k: v.clone() for k, v in model.state_dict().items()}


def test_lora_run_trains_adapters_only_and_lowers_the_loss(base, tmp_path) -> None:
    folder, weights = base
    out = tmp_path / "ft"
    assert main(["train", "--init", str(folder), *FAST, *LORA, "--set", "train.steps=60", "--set",
                 "train.eval_every=20", "--out", str(out)]) == 0  # fmt: skip
    losses = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    base_loss = [r["val_loss"] for r in read_metrics(folder) if "val_loss" in r][-1]  # same data and split
    # adapters start at ΔW = 0, so the run starts at base_loss (3.137 here) and ends 0.07 lower
    assert losses[-1] < base_loss - 0.03 and losses[-1] < losses[0]
    ckpt = latest_checkpoint(out)
    run = read_run_config(ckpt)
    assert run.train.lora == LoRAConfig(rank=4, alpha=8.0)
    model = Transformer(run.model)
    apply_lora(model, run.train.lora)
    load_training_state(ckpt, model)
    for name, value in base_state_dict(model).items():  # the frozen base is the --init model, bit for bit
        assert torch.equal(value, weights[name]), name
    adapters = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert adapters and all(p.abs().sum() > 0 for p in adapters)


def test_resume_keeps_adapters_and_lora_cannot_change(base, tmp_path, capsys) -> None:
    folder, _ = base
    out = tmp_path / "ft"
    common = ["train", "--init", str(folder), *FAST, *LORA, "--set", "train.steps=6", "--out", str(out)]
    assert main([*common, "--stop-after", "3"]) == 0
    assert main([*common, "--resume"]) == 0
    assert main([*common[:-2], "--set", "train.lora.rank=2", "--out", str(out), "--resume",
                 "--allow-config-change"]) == 2  # fmt: skip
    assert "train.lora.rank" in capsys.readouterr().err


def test_lora_config_from_overrides() -> None:
    cfg = apply_overrides(RunConfig(), ["train.lora.rank=8", "train.lora.targets=[attention,mlp,experts]"])
    assert cfg.train.lora.enabled and cfg.train.lora.scale == 2.0
    assert not RunConfig().train.lora.enabled
    with pytest.raises(ConfigError, match=r"train\.lora\.targets"):
        apply_overrides(RunConfig(), ["train.lora.targets=[router]"])


def test_a_lora_checkpoint_loads_merged_and_evaluates_as_trained(base, tmp_path, capsys) -> None:
    """eval/generate/convert read the checkpoint as one plain model (adapters folded in) whose loss is the
    trainer's own final validation loss."""
    import json

    from moelab.model.lora import is_lora
    from moelab.train.checkpoint import load_model

    folder, _ = base
    out = tmp_path / "ft"
    assert main(["train", "--init", str(folder), *FAST, *LORA, "--set", "train.steps=8", "--out", str(out)]) == 0
    capsys.readouterr()
    model, _ = load_model(out)
    assert not is_lora(model) and not any("lora_" in n for n in model.state_dict())
    ckpt = latest_checkpoint(out)
    adapted = Transformer(read_run_config(ckpt).model)
    apply_lora(adapted, read_run_config(ckpt).train.lora)
    load_training_state(ckpt, adapted)  # the model as the trainer held it: base + parametrized adapters
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0
    assert main(["convert", str(out), str(tmp_path / "merged"), "--to", "moelab"]) == 0
    merged, _ = load_model(tmp_path / "merged")
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), model.state_dict().values()))


def test_a_config_yaml_that_is_not_utf8_is_one_line(tmp_path) -> None:
    from moelab.errors import UserError

    (tmp_path / "config.yaml").write_bytes(b"model:\n  d_model: \xff\xfe\n")
    with pytest.raises(UserError, match="cannot read"):
        read_run_config(tmp_path)

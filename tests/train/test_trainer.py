"""The trainer: bitwise split resume, NaN steps skipped then a clear stop, schedule, optimizer groups."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.checkpoint.folder import list_checkpoints
from moelab.config import DataConfig, RunConfig, TrainConfig
from moelab.data.prepare import prepare_data
from moelab.model.transformer import Transformer
from moelab.train.logging import read_metrics
from moelab.train.optim import lr_at, param_groups
from moelab.train.trainer import RouterHealthWarning, Trainer, TrainingDiverged, evaluate

from helpers import tiny_config, tiny_moe


def _cfg(steps: int = 8, **train) -> RunConfig:
    return RunConfig(
        name="t",
        model=tiny_config(moe=tiny_moe(z_loss_coef=1e-3)),
        data=DataConfig(corpus="synthetic", tokenizer="bytes", seq_len=32, synthetic_docs=8),
        train=TrainConfig(
            steps=steps, batch_size=4, grad_accum=2, warmup_steps=2, eval_every=4, eval_batches=2,
            log_every=1, progress=False, **train,
        ),
    )


@pytest.fixture(scope="module")
def data():
    return prepare_data(_cfg())[1]


def _train_records(run_dir) -> list[dict]:
    timing = {"tokens_per_s", "train_time_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_split_resume_is_bitwise_identical(tmp_path, data) -> None:
    cfg = _cfg(steps=8)
    whole = Trainer(cfg, tmp_path / "whole", data=data)
    whole.train()

    first = Trainer(cfg, tmp_path / "split", data=data)
    first.train(stop_at=4)
    assert first.step == 4 and list_checkpoints(tmp_path / "split")
    torch.manual_seed(999)  # a resumed process starts from arbitrary RNG state
    second = Trainer(cfg, tmp_path / "split", data=data)
    second.train(resume=True)
    assert second.step == 8

    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    log_whole, log_split = _train_records(tmp_path / "whole"), _train_records(tmp_path / "split")
    assert [r["step"] for r in log_split] == list(range(1, 9))
    assert log_whole == log_split
    assert log_whole[-1]["loss"] < log_whole[0]["loss"]
    assert {"load_balance", "z_loss", "drop_rate", "max_expert_load", "lr", "grad_norm"} <= set(log_whole[0])


def test_nan_loss_steps_are_skipped_then_the_run_stops(tmp_path, data) -> None:
    trainer = Trainer(_cfg(steps=10, max_bad_steps=3), tmp_path, data=data)
    calls = {"n": 0}

    def poison(module, inputs, output):  # micro-batches 5.. (steps 3..) get a NaN loss
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 5 else output

    trainer.model.lm_head.register_forward_hook(poison)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="not finite for 3 steps in a row"):
        trainer.train()
    recs = _train_records(tmp_path)
    assert [r["skipped"] for r in recs] == [False, False, True, True, True]
    assert [r["bad_steps"] for r in recs] == [0, 0, 1, 2, 3]
    # skipped steps did not touch the weights: they equal the weights after step 2
    trainer2 = Trainer(_cfg(steps=10), tmp_path / "ref", data=data)
    trainer2.train(stop_at=2)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, trainer2.model.state_dict()[k]), k
        assert torch.isfinite(v).all()
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_one_bad_step_is_survived(tmp_path, data) -> None:
    trainer = Trainer(_cfg(steps=4, max_bad_steps=2), tmp_path, data=data)
    calls = {"n": 0}

    def poison_once(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    trainer.model.lm_head.register_forward_hook(poison_once)
    trainer.train()
    recs = _train_records(tmp_path)
    assert [r["skipped"] for r in recs] == [False, True, False, False] and recs[-1]["bad_steps"] == 1


def test_lr_schedule_warmup_then_cosine() -> None:
    tc = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(10, tc) == pytest.approx(1.0)
    mid = 10 + 99 / 2  # cosine half way: (1 + 0.1) / 2
    assert lr_at(int(mid), tc) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 99)))
    assert lr_at(109, tc) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_embeddings() -> None:
    model = Transformer(tiny_config(moe=tiny_moe(), norm="layernorm"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in no_decay_names and not any("norm" in n for n in decay_names)
    assert any(n.endswith("bias") for n in no_decay_names)
    assert any("experts.w_up" in n for n in decay_names) and any("router" in n for n in decay_names)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay_names | no_decay_names) == len(list(model.parameters()))


def test_evaluate_matches_the_model_loss_and_splits_by_domain(data) -> None:
    cfg = _cfg()
    from dataclasses import replace

    model = Transformer(replace(cfg.model, vocab_size=data.tokenizer.vocab_size))
    from moelab.data.loader import eval_batches

    batches = eval_batches(data.splits.val, 4, 1)
    r = evaluate(model, batches, data.splits.val.label_names)
    b = batches[0]
    with torch.no_grad():
        expected = float(model(b.input_ids, labels=b.labels).loss)
    assert r.loss == pytest.approx(expected, rel=1e-5)
    per = r.loss_by["domain"]
    counts = {}
    for v in b.label_ids["domain"][b.labels != -100].tolist():
        name = data.splits.val.label_names["domain"][v]
        counts[name] = counts.get(name, 0) + 1
    assert set(per) == set(counts)
    assert sum(per[d] * counts[d] for d in per) / sum(counts.values()) == pytest.approx(r.loss, rel=1e-6)
    assert set(r.expert_load) == {0, 1} and all(sum(v) == pytest.approx(1.0) for v in r.expert_load.values())


def test_bf16_autocast_trains_and_auto_follows_the_hardware(tmp_path, data, monkeypatch) -> None:
    import moelab.train.evaluation as evaluation_mod
    from moelab.train.trainer import resolve_precision

    monkeypatch.setattr(evaluation_mod, "bf16_is_fast", lambda device: True)
    assert resolve_precision("auto", torch.device("cpu")) and resolve_precision("bf16", torch.device("cpu"))
    monkeypatch.setattr(evaluation_mod, "bf16_is_fast", lambda device: False)
    assert not resolve_precision("auto", torch.device("cpu")) and not resolve_precision("fp32", torch.device("cpu"))
    trainer = Trainer(_cfg(steps=3, precision="bf16"), tmp_path, data=data)
    assert trainer.bf16
    result = trainer.train()
    assert math.isfinite(result.loss)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, not a bf16 model


def test_router_health_is_logged_and_a_collapse_warns_once(tmp_path, data) -> None:
    # A 1% threshold makes any router "collapsed" after one step: the warning path must fire, once per layer.
    cfg = _cfg(steps=3)
    cfg = RunConfig(
        name=cfg.name,
        model=tiny_config(moe=tiny_moe(health_collapse_share=0.01, health_collapse_steps=1)),
        data=cfg.data,
        train=cfg.train,
    )
    trainer = Trainer(cfg, tmp_path, data=data)
    with pytest.warns(RouterHealthWarning, match="router collapse in MoE layer") as caught:
        trainer.train()
    collapse = [w for w in caught if "router collapse" in str(w.message)]
    assert len(collapse) == len(trainer.model.moe_layers)
    rec = _train_records(tmp_path)[-1]
    for i in range(len(trainer.model.moe_layers)):
        assert 0.0 < rec[f"moe/layer{i}/max_load"] <= 1.0
        assert 0.0 <= rec[f"moe/layer{i}/load_entropy"] <= 1.0

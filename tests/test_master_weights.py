"""``train.precision=bf16-master``: bf16 weights, AdamW over fp32 masters (moelab.train.master_weights).

Tolerances of the comparison with bf16 autocast over fp32 weights (same model, seed and batches, 20 steps,
measured on CPU): training losses agree within 0.03 % (bound 1 %); each final master is off the fp32 run's
weight by at most 6 % of how far that weight moved in training (bound 15 %). Stepping the bf16 weights
directly (no master) leaves most norm gains at exactly 1.0 (81 % measured; its AdamW updates, at most lr = 3e-3,
are under half a bf16 ulp above 1, 2⁻⁸ ≈ 3.9e-3), so there the error is ≈ 100 % of the distance moved (bounds:
more than 50 %; over 60 % of the gains still 1.0, under 10 % of the masters).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from moelab.checkpoint.folder import list_checkpoints
from moelab.config import DataConfig, LoRAConfig, RouterConfig, RunConfig, TrainConfig
from moelab.convert.load import load_checkpoint_model
from moelab.data.prepare import prepare_data
from moelab.errors import ConfigError
from moelab.model.transformer import Transformer
from moelab.moe.routers.base import Router
from moelab.train.evaluation import evaluate, resolve_precision
from moelab.train.logging import read_metrics
from moelab.train.master_weights import MasterWeightAdamW, checkpoint_weights
from moelab.train.optim import adamw_options, build_optimizer, fused_supported, param_groups
from moelab.train.trainer import Trainer

from helpers import tiny_config, tiny_moe

CPU = torch.device("cpu")


def _cfg(precision: str = "bf16-master", steps: int = 20, router: str = "topk", **train) -> RunConfig:
    train = {"grad_accum": 1, "warmup_steps": 2, "eval_every": 0, **train}
    return RunConfig(
        name="m",
        model=tiny_config(moe=tiny_moe(z_loss_coef=1e-3, router=RouterConfig(name=router))),
        data=DataConfig(corpus="synthetic", tokenizer="bytes", seq_len=32, synthetic_docs=8),
        train=TrainConfig(
            steps=steps,
            batch_size=4,
            eval_batches=2,
            log_every=1,
            progress=False,
            precision=precision,
            **train,
        ),
    )


@pytest.fixture(scope="module")
def data():
    return prepare_data(_cfg())[1]


def _losses(trainer: Trainer) -> list[float]:
    return [r["loss"] for r in trainer.history if r["kind"] == "train"]


def _masters(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The weights a checkpoint of ``trainer`` would hold (the fp32 masters under bf16-master)."""
    with checkpoint_weights(trainer.optimizer):
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(moe=tiny_moe(), vocab_size=61))


def _backward(model: Transformer, seed: int = 1) -> None:
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(seed))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids[:, :-1], labels=ids[:, 1:])
    out.total_loss.backward()


def test_bf16_master_trains_like_bf16_autocast_and_better_than_bf16_weights_alone(tmp_path, data) -> None:
    start = {
        n: p.detach().clone()
        for n, p in Trainer(_cfg("fp32"), tmp_path / "init", data=data).model.named_parameters()
    }
    ref = Trainer(_cfg("bf16"), tmp_path / "bf16", data=data)  # autocast over fp32 weights
    ref.train()
    run = Trainer(_cfg(), tmp_path / "master", data=data)
    run.train()
    bare = Trainer(_cfg(), tmp_path / "bare", data=data)  # the same bf16 weights, AdamW on them: no master
    bare.optimizer = build_optimizer(bare.model, bare.cfg.train)
    bare.train()

    ref_loss, run_loss = _losses(ref), _losses(run)
    assert len(run_loss) == 20 and run_loss[-1] < run_loss[0] - 0.5
    assert max(abs(a - b) / b for a, b in zip(run_loss, ref_loss)) < 1e-2

    def error(weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """|w − fp32 run's w| / |distance the fp32 run's w moved|, per parameter."""
        out = {}
        for n, w in ref.model.named_parameters():
            out[n] = float((weights[n].float() - w.detach()).norm() / (w.detach() - start[n]).norm())
        return out

    masters = _masters(run)
    assert all(m.dtype == torch.float32 for m in masters.values())
    assert max(error(masters).values()) < 0.15
    bare_error = error({n: p.detach() for n, p in bare.model.named_parameters()})
    assert max(bare_error.values()) > 0.5
    gains = [n for n in masters if n.endswith("norm.weight")]
    still_one = lambda ws: float(torch.cat([(ws[n] == 1).float() for n in gains]).mean())  # noqa: E731
    assert still_one({n: p.detach() for n, p in bare.model.named_parameters()}) > 0.6  # updates rounded away
    assert still_one(masters) < 0.1
    for n, p in run.model.named_parameters():  # the bf16 weights are the masters rounded once
        assert torch.equal(p.detach(), masters[n].to(p.dtype)), n


def test_one_step_is_adamw_on_fp32_copies_with_the_bf16_gradients() -> None:
    model = _tiny_model()
    tc = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = fused_supported(model)
    ref_groups = [{**g, "params": [p.detach().clone().requires_grad_() for p in g["params"]]}
                  for g in param_groups(model, tc.weight_decay)]  # fmt: skip
    opt = MasterWeightAdamW.for_training(model, tc)
    _backward(model)
    grads = [p.grad.clone() for g in param_groups(model, tc.weight_decay) for p in g["params"]]
    assert {g.dtype for g in grads} == {torch.bfloat16, torch.float32}  # routers' are fp32
    ref = torch.optim.AdamW(ref_groups, **adamw_options(tc, fused))
    for p, grad in zip((p for group in ref_groups for p in group["params"]), grads):
        p.grad = grad.float()
    ref.step()
    opt.step()
    inner = [p for g in opt.param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in inner)
    for want, got in zip((p for g in ref_groups for p in g["params"]), inner):
        assert torch.equal(want, got)
    for p, master in opt.pairs:
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), master.to(torch.bfloat16))
    assert opt.inner.defaults["fused"] == (fused or None)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_routers_and_router_bias_stay_fp32_and_the_balancer_still_updates(tmp_path, data) -> None:
    run = Trainer(_cfg(steps=3, router="sigmoid_bias"), tmp_path, data=data)
    routers = {id(p) for m in run.model.modules() if isinstance(m, Router) for p in m.parameters()}
    assert routers
    for p in run.model.parameters():
        assert p.dtype == (torch.float32 if id(p) in routers else torch.bfloat16)
    assert resolve_precision("bf16-master", CPU) is True
    run.train()
    for layer in run.model.moe_layers:
        assert layer.router.bias.dtype == torch.float32 and bool(layer.router.bias.abs().sum() > 0)
        assert layer.router.gate.weight.dtype == torch.float32
    full = Transformer(run.model.cfg)  # the fp32 masters in an fp32 model, under the same autocast
    with checkpoint_weights(run.optimizer):
        full.load_state_dict(run.model.state_dict())  # router bias included
    want = evaluate(full, run.val_batches, data.splits.val.label_names, bf16=True).loss
    assert run.evaluate().loss == pytest.approx(want, rel=1e-2)  # the bf16 model evaluates under autocast


def test_clipping_reads_the_fp32_master_gradients(tmp_path, data, monkeypatch) -> None:
    run = Trainer(_cfg(steps=1, grad_clip=1e-3, grad_accum=2), tmp_path, data=data)
    seen = {}
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        seen["dtypes"] = {p.grad.dtype for p in params}
        seen["masters"] = all(any(p is m for p in params) for m in run.optimizer.masters)
        seen["bf16_grads"] = [
            p for p in run.model.parameters() if p.grad is not None and p.dtype == torch.bfloat16
        ]
        seen["norm"] = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        return clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    rec = run.train_step()
    assert seen["dtypes"] == {torch.float32} and seen["masters"] and seen["bf16_grads"] == []
    assert rec["grad_norm"] == pytest.approx(seen["norm"]) and rec["grad_norm"] > 1e-3  # it did clip


def test_gradients_move_to_the_masters_and_zero_grad_clears_both() -> None:
    model = _tiny_model()
    opt = MasterWeightAdamW(model, [{"params": list(model.parameters())}], lr=1e-3)
    _backward(model, seed=1)
    first = [p.grad.float() for p, _ in opt.pairs]
    opt.accumulate_grads()
    assert all(p.grad is None for p, _ in opt.pairs)
    assert all(torch.equal(m.grad, g) for m, g in zip(opt.masters, first))
    _backward(model, seed=2)  # a second micro-batch sums in fp32
    second = [p.grad.float() for p, _ in opt.pairs]
    opt.accumulate_grads()
    assert all(torch.equal(m.grad, a + b) for m, a, b in zip(opt.masters, first, second))
    _backward(model, seed=3)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])


def test_state_dict_round_trip_continues_exactly() -> None:
    a_model = _tiny_model()
    a = MasterWeightAdamW(a_model, param_groups(a_model, 0.1), lr=1e-2)
    for seed in (1, 2):
        _backward(a_model, seed)
        a.step()
        a.zero_grad()
    b_model = _tiny_model()
    b = MasterWeightAdamW(b_model, param_groups(b_model, 0.1), lr=1e-3)
    with a.masters_in_model():
        weights = {k: v.clone() for k, v in a_model.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in weights.values())
    with b.masters_in_model():
        b_model.load_state_dict(weights)
    b.load_state_dict(
        copy.deepcopy(a.state_dict())
    )  # torch's load keeps the tensors it gets: copy, as from disk
    assert b.param_groups[0]["lr"] == 1e-2
    for model, opt in ((a_model, a), (b_model, b)):
        _backward(model, seed=3)
        opt.step()
    for pa, pb in zip(a_model.parameters(), b_model.parameters()):
        assert pa.dtype == pb.dtype and torch.equal(pa, pb)
    for ma, mb in zip(a.masters, b.masters):
        assert torch.equal(ma, mb)


def test_checkpoint_holds_the_fp32_masters_and_a_split_resume_is_bitwise_identical(tmp_path, data) -> None:
    cfg = _cfg(steps=6, grad_accum=2, eval_every=3)
    whole = Trainer(cfg, tmp_path / "whole", data=data)
    whole.train()
    first = Trainer(cfg, tmp_path / "split", data=data)
    first.train(stop_at=3)
    torch.manual_seed(999)  # a resumed process starts from arbitrary RNG state
    second = Trainer(cfg, tmp_path / "split", data=data)
    second.train(resume=True)
    assert second.step == 6
    for (name, a), b in zip(_masters(whole).items(), _masters(second).values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    records = [[{k: v for k, v in r.items() if k not in ("tokens_per_s", "train_time_s")} for r in read_metrics(d)]
               for d in (tmp_path / "whole", tmp_path / "split")]  # fmt: skip
    assert records[0] == records[1]

    ckpt = list_checkpoints(tmp_path / "split")[-1]
    masters = _masters(second)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    assert {t.dtype for t in saved.values()} == {torch.float32}
    for name, t in saved.items():
        assert torch.equal(t, masters[name]), name
    loaded, _ = load_checkpoint_model(ckpt)  # what evaluation and export read: fp32 weights
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.norm.weight, masters["norm.weight"])
    assert json.loads((ckpt / "state.json").read_text())["train_state"]["step"] == 6


def test_config_names_the_precisions_and_refuses_lora_with_bf16_master() -> None:
    with pytest.raises(ConfigError) as exc:
        TrainConfig(precision="bf17")
    msg = str(exc.value)
    assert "train.precision='bf17' is invalid" in msg
    assert all(repr(p) in msg for p in ("fp32", "bf16", "bf16-master", "auto"))
    assert TrainConfig(precision="bf16-master").precision == "bf16-master"
    with pytest.raises(ConfigError, match=r"train\.precision='bf16-master' is invalid: .*LoRA"):
        TrainConfig(precision="bf16-master", lora=LoRAConfig(rank=4))


def test_bench_training_step_with_bf16_masters() -> None:
    from moelab.benchmarks.model import bench_model, training_step_fn

    step, model = training_step_fn(tiny_config(moe=tiny_moe()), 1, 8, torch.bfloat16, CPU, master=True)
    before = model.lm_head.weight.detach().clone()
    step()
    assert model.lm_head.weight.dtype == torch.bfloat16 and not torch.equal(model.lm_head.weight, before)
    assert model.blocks[0].ffn.router.gate.weight.dtype == torch.float32
    rec = bench_model("smoke", batch=1, seq=8, dtype=torch.bfloat16, device=CPU, repeats=1, master=True)
    assert rec["dtype"] == "bf16-master" and set(rec["tokens_per_s"]) == {"moe", "dense"}


def test_bench_reports_bf16_master_beside_autocast(monkeypatch) -> None:
    import moelab.benchmarks.runner as runner
    from moelab.benchmarks.report import to_markdown

    calls = []

    def fake(preset_name, batch, seq, dtype, device, repeats, dispatch="auto", master=False):
        calls.append((str(dtype), master))
        label = "bf16-master" if master else str(dtype).removeprefix("torch.")
        return {"preset": preset_name, "dtype": label, "batch": batch, "seq": seq,
                "tokens_per_s": {"moe": 1.0, "dense": 2.0}, "moe_vs_dense_time": 2.0}  # fmt: skip

    monkeypatch.setattr(runner, "ISSUE_SHAPES", ((4, 2, 16),))
    monkeypatch.setattr(runner, "bench_model", fake)
    opts = runner.BenchOptions(quick=True, tokens=16, repeats=1, backends=("sorted",), hf=False)
    result = runner.run_bench(opts, log=lambda _: None)
    assert calls == [("torch.float32", False), ("torch.bfloat16", False), ("torch.bfloat16", True)]
    md = to_markdown(result)
    assert "| tiny | bfloat16 | 4×128 |" in md and "| tiny | bf16-master | 4×128 |" in md
    fp32_only = to_markdown({**result, "model": result["model"][:1]})
    assert "bf16-master" not in fp32_only  # a run without bf16 reads as before


def test_torchrun_refuses_bf16_master_in_one_line(tmp_path) -> None:
    from moelab.errors import UserError
    from moelab.parallel.trainer import DistributedTrainer

    with pytest.raises(UserError, match=r"train\.precision=bf16-master is not supported under torchrun yet"):
        DistributedTrainer(_cfg(), tmp_path, layout=None)  # type: ignore[arg-type]

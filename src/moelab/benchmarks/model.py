"""Full-model training step, tokens/s: an MoE preset next to its iso-active dense twin.

A plain AdamW loop (forward, ``total_loss`` backward, step) on random tokens, independent of
the trainer so it measures the model alone. Both models see the same batches; steps are
interleaved and the median reported. In bf16 the step runs under autocast with fp32 weights (as
``train.precision=bf16``), or with ``master=True`` with bf16 weights and AdamW over fp32 masters
(:class:`~moelab.train.master_weights.MasterWeightAdamW`, as ``train.precision=bf16-master``): no
per-step weight casts, one fp32→bf16 copy of the weights after each step instead.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moelab.benchmarks.layer import autocast_for
from moelab.benchmarks.timing import interleaved
from moelab.config import ModelConfig, preset
from moelab.model.transformer import Transformer
from moelab.model.twins import count_params, dense_twin
from moelab.train.master_weights import MASTER_PRECISION, MasterWeightAdamW
from moelab.train.optim import fused_supported


def training_step_fn(
    cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, device: torch.device, master: bool = False
):
    """``(step, model)``: one AdamW training step of ``cfg`` on a fixed random batch; ``master`` stores the
    weights in bf16 (routers fp32) with fp32 masters in the optimizer (``dtype`` must then be bf16)."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    fused = fused_supported(model) or None  # as the trainer
    opt: torch.optim.Optimizer | MasterWeightAdamW
    if master:
        assert dtype == torch.bfloat16, "bf16-master runs bf16 weights under bf16 autocast"
        opt = MasterWeightAdamW(model, [{"params": list(model.parameters())}], lr=1e-4, fused=fused)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_for(dtype, device):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        out.total_loss.backward()
        opt.step()

    return step, model


def bench_model(
    preset_name: str,
    batch: int,
    seq: int,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    dispatch: str = "auto",
    master: bool = False,
) -> dict[str, object]:
    """tokens/s of one training step of the MoE preset (``dispatch`` backend) and its dense twin; with
    ``master`` (bf16 only) both store bf16 weights and step fp32 masters (dtype label ``bf16-master``)."""
    moe_cfg = preset(preset_name)
    assert moe_cfg.moe is not None
    moe_cfg = replace(
        moe_cfg, moe=replace(moe_cfg.moe, dispatch=dispatch), max_seq_len=max(seq, moe_cfg.max_seq_len)
    )
    dense_cfg = dense_twin(moe_cfg)
    moe_step, moe_model = training_step_fn(moe_cfg, batch, seq, dtype, device, master)
    dense_step, dense_model = training_step_fn(dense_cfg, batch, seq, dtype, device, master)
    times = interleaved({"moe": moe_step, "dense": dense_step}, repeats=repeats, device=device)
    tokens = batch * seq
    return {
        "preset": preset_name,
        "dispatch": dispatch,
        "dtype": MASTER_PRECISION if master else str(dtype).removeprefix("torch."),
        "batch": batch,
        "seq": seq,
        "active_params": {"moe": count_params(moe_model).active, "dense": count_params(dense_model).active},
        "tokens_per_s": {name: tokens / t for name, t in times.items()},
        "moe_vs_dense_time": times["moe"] / times["dense"],
    }

"""Full-model training step, tokens/s: an MoE preset next to its iso-active dense twin.

A plain AdamW loop (forward, ``total_loss`` backward, step) on random tokens, independent of
the trainer so it measures the model alone. Both models see the same batches; steps are
interleaved and the median reported.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moelab.benchmarks.layer import autocast_for
from moelab.benchmarks.timing import interleaved
from moelab.config import ModelConfig, preset
from moelab.model.transformer import Transformer
from moelab.model.twins import count_params, dense_twin
from moelab.train.optim import fused_supported


def training_step_fn(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_supported(model) or None)  # as the trainer
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
) -> dict[str, object]:
    """tokens/s of one training step of the MoE preset (``dispatch`` backend) and its dense twin."""
    moe_cfg = preset(preset_name)
    assert moe_cfg.moe is not None
    moe_cfg = replace(
        moe_cfg, moe=replace(moe_cfg.moe, dispatch=dispatch), max_seq_len=max(seq, moe_cfg.max_seq_len)
    )
    dense_cfg = dense_twin(moe_cfg)
    moe_step, moe_model = training_step_fn(moe_cfg, batch, seq, dtype, device)
    dense_step, dense_model = training_step_fn(dense_cfg, batch, seq, dtype, device)
    times = interleaved({"moe": moe_step, "dense": dense_step}, repeats=repeats, device=device)
    tokens = batch * seq
    return {
        "preset": preset_name,
        "dispatch": dispatch,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "seq": seq,
        "active_params": {"moe": count_params(moe_model).active, "dense": count_params(dense_model).active},
        "tokens_per_s": {name: tokens / t for name, t in times.items()},
        "moe_vs_dense_time": times["moe"] / times["dense"],
    }

"""Distributed throughput benchmark: tokens/s and all-to-all bytes per step (not a test).

Run under torchrun, e.g. on CPU::

    torchrun --nproc-per-node 2 -m moelab bench-dist --ep 2 --steps 20
    moelab bench-dist --steps 20                            # world 1

Every rank trains a small MoE model on random tokens with :func:`train_step`; rank 0 prints
one JSON line: world, dp, ep, global batch, median step time, tokens/s and all-to-all bytes
sent per step (all ranks, forward + backward). Same model and global batch at every world size,
so the numbers compare.
"""

from __future__ import annotations

import statistics
import time

import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.model.transformer import Transformer
from moelab.parallel.env import fail_together, init_distributed, shutdown
from moelab.parallel.expert_parallel import shard_experts
from moelab.parallel.mesh import build_layout
from moelab.parallel.train_step import shard_rows, train_step
from moelab.parallel.wrap import build_data_parallel


def bench(
    ep: int, steps: int, warmup: int, global_batch: int, seq: int, d_model: int, experts: int, mode: str
) -> dict:
    env = init_distributed(timeout_s=120)
    with fail_together(env):
        layout = build_layout(env, ep=ep, num_experts=experts)
        moe = MoEConfig(num_experts=experts, top_k=2, expert_hidden=2 * d_model, dispatch="ep")
        cfg = ModelConfig(
            vocab_size=512,
            d_model=d_model,
            n_layers=2,
            n_heads=4,
            ffn_hidden=4 * d_model,
            max_seq_len=seq,
            moe=moe,
        )
        torch.manual_seed(0)
        model = Transformer(cfg).to(env.device)
        comm = shard_experts(model, layout.ep_group)
        dp = build_data_parallel(mode, layout)
        wrapped = dp.wrap(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rows = shard_rows(global_batch, layout)
        g = torch.Generator().manual_seed(0)
        times, a2a = [], []
        for step in range(warmup + steps):
            ids = torch.randint(0, cfg.vocab_size, (global_batch, seq + 1), generator=g)
            x, y = ids[rows, :-1].to(env.device), ids[rows, 1:].to(env.device)
            t0 = time.perf_counter()
            m = train_step(wrapped, dp, opt, x, y, layout, comm)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
                a2a.append(m.a2a_bytes)
        step_s = statistics.median(times)
        result = {
            "world": layout.world_size,
            "dp": layout.dp,
            "ep": layout.ep,
            "mode": mode,
            "device": str(env.device),
            "global_batch": global_batch,
            "seq": seq,
            "d_model": d_model,
            "experts": experts,
            "step_s": round(step_s, 4),
            "tokens_per_s": round(global_batch * seq / step_s, 1),
            "a2a_bytes_per_step": int(statistics.median(a2a)),
        }
    shutdown()
    return result if env.is_main else {}


__all__ = ["bench"]

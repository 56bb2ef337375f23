"""Checkpoints of a sharded run in moelab's ordinary (unsharded) format, loadable at any world size.

Why gather rather than ``torch.distributed.checkpoint``: moelab checkpoints are safetensors
folders that ``load_model`` and every other command read without a process group. So the
expert shards and their AdamW moments are all-gathered over the ep group, rank 0 rebuilds an
unsharded model and optimizer and writes them with :func:`moelab.checkpoint.state.save_checkpoint`;
loading reverses it: every rank reads the folder, restores the full model and optimizer, then
keeps its own expert slice. Parameter order is unchanged by sharding (an ExpertShard sits where
its Experts was), so optimizer entries line up by index. Memory: one full copy per rank while
saving/loading, fine for the models moelab trains; FSDP2 runs would use DCP instead (not yet).

Legend: E experts, L local experts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moelab.checkpoint.folder import read_run_config, resolve_checkpoint
from moelab.checkpoint.state import load_training_state, save_checkpoint
from moelab.config import ModelConfig, RunConfig
from moelab.data.tokenizer import Tokenizer
from moelab.errors import UserError
from moelab.parallel.expert_parallel import ExpertShard, full_state_dict, shard_experts
from moelab.parallel.mesh import ParallelLayout
from moelab.parallel.wrap import unwrap

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


def _expert_param_shards(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, ExpertShard]:
    """Index in the optimizer's state dict → the ExpertShard owning that parameter.

    State-dict indices follow the optimizer's param groups in order (the trainer's AdamW has a
    decay and a no-decay group), not ``model.parameters()``.
    """
    owners = {
        id(p): m for m in model.modules() if isinstance(m, ExpertShard) for p in m.parameters(recurse=False)
    }
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: owners[id(p)] for i, p in enumerate(ordered) if id(p) in owners}


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state dict of the unsharded model (a collective when ep > 1)."""
    sd = optimizer.state_dict()
    shards = _expert_param_shards(model, optimizer)
    state = {}
    for idx, st in sd["state"].items():
        shard = shards.get(idx)
        out = {}
        for key, value in st.items():
            if (
                shard is not None
                and isinstance(value, torch.Tensor)
                and value.dim() > 0
                and shard.ep.size > 1
            ):
                parts = [torch.empty_like(value) for _ in range(shard.ep.size)]
                dist.all_gather(parts, value.contiguous(), group=shard.ep.group)
                value = torch.cat(parts, dim=0)
            out[key] = value
        state[idx] = out
    return {"state": state, "param_groups": sd["param_groups"]}


def save_sharded_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: RunConfig | ModelConfig,
    tokenizer: Tokenizer,
    layout: ParallelLayout,
    optimizer_factory: OptimizerFactory,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Gather and write an ordinary checkpoint from rank 0; every rank must call it."""
    from moelab.model.transformer import Transformer

    inner = unwrap(model)
    if any(hasattr(p, "full_tensor") for p in inner.parameters()):
        raise UserError(
            "saving FSDP2 (fsdp) runs in the gathered format is not supported yet: use the ddp or manual "
            "data-parallel mode, or torch.distributed.checkpoint"
        )
    state = full_state_dict(inner)
    opt_state = gather_optimizer_state(inner, optimizer)
    if layout.env.is_main:
        model_cfg = config.model if isinstance(config, RunConfig) else config
        full = Transformer(model_cfg)
        full.load_state_dict(state)
        full_opt = optimizer_factory(full)
        full_opt.load_state_dict(opt_state)
        save_checkpoint(path, full, config, tokenizer, full_opt, train_state)
    if dist.is_initialized():
        dist.barrier()
    return Path(path)


def load_sharded_checkpoint(
    path: str | Path, layout: ParallelLayout, optimizer_factory: OptimizerFactory
) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any], RunConfig]:
    """``(model, optimizer, train_state, run_config)`` with this rank's experts, from any world size.

    The model is on ``layout.env.device``, sharded over ``layout.ep_group``, not yet wrapped for
    data parallelism (FSDP2 would need a fresh optimizer after wrapping; DDP/manual keep this one).
    """
    from moelab.model.transformer import Transformer

    ckpt = resolve_checkpoint(path)
    cfg = read_run_config(ckpt)
    model = Transformer(cfg.model).to(layout.env.device)  # before the optimizers: their state follows
    full_opt = optimizer_factory(model)
    train_state = load_training_state(ckpt, model, full_opt)
    full_sd = full_opt.state_dict()
    if layout.ep > 1 or layout.ep_group is not None:
        shard_experts(model, layout.ep_group)
    optimizer = optimizer_factory(model)
    shards = _expert_param_shards(model, optimizer)
    for idx, shard in shards.items():
        sl = slice(shard.first_expert, shard.first_expert + shard.num_experts)
        st = full_sd["state"].get(idx, {})
        for key, value in list(st.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                st[key] = value[sl].clone()
    optimizer.load_state_dict(full_sd)
    return model, optimizer, train_state, cfg

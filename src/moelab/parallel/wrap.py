"""Data-parallel wrappers: how gradients are combined across ranks.

Gradient semantics (all modes): each rank backpropagates its *scaled* local loss (see
``train_step.local_objective``) and after :meth:`DataParallel.sync` every rank holds the
gradient of the global objective, exactly what one process would get for the global batch.
Non-expert gradients are averaged over all W ranks; expert gradients (sharded over ``ep``) are
summed over ``dp`` and divided by W, since the loss scaling already counts every rank once.

Modes, by name in ``DATA_PARALLEL``:
- ``manual``: plain ``all_reduce`` of every gradient after backward; obvious, the reference.
- ``ddp``: ``DistributedDataParallel`` over the world for non-expert parameters (bucketed,
  overlapped with backward); expert parameters are ignored by DDP and reduced over dp here.
- ``fsdp``: FSDP2 ``fully_shard``: each expert module sharded over the dp mesh (its gradient
  divide factor set to W), then each block and the root over the whole world.

Legend: W world size, dp data-parallel size, ep expert-parallel size.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from moelab.parallel.expert_parallel import ExpertShard, is_expert_param
from moelab.parallel.mesh import ParallelLayout
from moelab.registry import Registry


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(non-expert, expert) trainable parameters, each once (tied weights are one parameter)."""
    dense, expert, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (expert if is_expert_param(name) else dense).append(p)
    return dense, expert


def _all_reduce_grads(params: list[nn.Parameter], group: object | None, divide_by: int) -> None:
    """Sum gradients over ``group`` (one flat buffer), then divide; missing grads count as zero."""
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if dist.is_initialized():
        dist.all_reduce(flat, group=group)
    flat /= divide_by
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


class DataParallel:
    """Wraps a model for data parallelism and finishes gradients after backward."""

    needs_model_wrapper: ClassVar[bool] = False

    def __init__(self, layout: ParallelLayout) -> None:
        self.layout = layout

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call forward on (the same model, or a wrapper around it)."""
        return model

    def sync(self, model: nn.Module) -> None:
        """Make every rank's gradients those of the global objective (see module doc)."""
        raise NotImplementedError

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context for a backward whose gradients are only accumulated (not the step's last)."""
        return contextlib.nullcontext()


DATA_PARALLEL: Registry[type[DataParallel]] = Registry("data-parallel mode")


@DATA_PARALLEL.register("manual")
class ManualDataParallel(DataParallel):
    """All-reduce every gradient after backward: the obvious reference."""

    def sync(self, model: nn.Module) -> None:
        dense, expert = _split_params(unwrap(model))
        W = self.layout.world_size
        _all_reduce_grads(dense, self.layout.world_group, W)
        _all_reduce_grads(expert, self.layout.dp_group, W)


@DATA_PARALLEL.register("ddp")
class DDPDataParallel(DataParallel):
    """DDP for non-expert parameters, all-reduce over dp for the expert shards."""

    def wrap(self, model: nn.Module) -> nn.Module:
        if not dist.is_initialized():
            return model
        from torch.nn.parallel import DistributedDataParallel

        ignore = [name for name, _ in model.named_parameters() if is_expert_param(name)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        device_ids = [self.layout.env.device] if self.layout.env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def sync(self, model: nn.Module) -> None:
        _, expert = _split_params(unwrap(model))
        _all_reduce_grads(expert, self.layout.dp_group, self.layout.world_size)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """DDP all-reduces during every backward unless told not to."""
        return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


@DATA_PARALLEL.register("fsdp")
class FSDPDataParallel(DataParallel):
    """FSDP2: experts sharded over dp, everything else over the world; parameters become DTensors,
    so build the optimizer *after* ``wrap``."""

    def wrap(self, model: nn.Module) -> nn.Module:
        if not dist.is_initialized():
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        layout = self.layout
        W = layout.world_size
        world_mesh = init_device_mesh(layout.env.device.type, (W,), mesh_dim_names=("world",))
        dp_mesh = layout.mesh["dp"] if layout.mesh is not None else world_mesh
        for mod in model.modules():
            if isinstance(mod, ExpertShard):
                fully_shard(mod, mesh=dp_mesh)
                mod.set_gradient_divide_factor(float(W))
        blocks = getattr(model, "blocks", [])
        for block in blocks:
            fully_shard(block, mesh=world_mesh)
        fully_shard(model, mesh=world_mesh)
        return model

    def sync(self, model: nn.Module) -> None:
        """Nothing to do: FSDP2 reduce-scatters gradients during backward."""


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 and manual modes do not wrap)."""
    return getattr(model, "module", model)


def build_data_parallel(name: str, layout: ParallelLayout) -> DataParallel:
    return DATA_PARALLEL[name](layout)

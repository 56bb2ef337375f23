"""Shard each MoE layer's experts over the expert-parallel group, and gather them back.

Why at wrapping time: configs hold data only, so the process group cannot travel in
``MoEConfig``. :func:`shard_experts` takes a model built the same way on every rank (same seed,
all E experts), keeps this rank's ``E/ep`` experts in an :class:`ExpertShard` that carries the
:class:`~moelab.moe.dispatch.ep.EPGroup`, and switches the layer to the ``ep`` dispatcher.
:func:`full_state_dict` is the inverse for checkpoints: every rank gets the model's ordinary
(unsharded) state dict, so files stay loadable at any world size.

Legend: E experts, L = E/ep local experts, D model dim, H = m·F up rows, F expert hidden.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.config import ConfigError
from moelab.moe.dispatch import DISPATCHERS
from moelab.moe.dispatch.ep import CommStats, EPGroup
from moelab.moe.experts import Experts
from moelab.moe.layer import MoELayer

EXPERT_PARAM_SUFFIXES = ("experts.w_up", "experts.w_down")


class ExpertShard(Experts):
    """``L`` of the ``E`` experts of one layer: global experts ``[first, first + L)``."""

    def __init__(self, full: Experts, ep: EPGroup) -> None:
        if full.num_experts % ep.size:
            raise ConfigError(f"ep={ep.size} does not divide the layer's {full.num_experts} experts")
        local = full.num_experts // ep.size
        super().__init__(local, full.d_model, full.hidden, full.activation)
        self.ep = ep
        self.num_global_experts = full.num_experts
        self.first_expert = ep.rank * local
        with torch.no_grad():
            sl = slice(self.first_expert, self.first_expert + local)
            self.w_up.copy_(full.w_up[sl])
            self.w_down.copy_(full.w_down[sl])

    def extra_repr(self) -> str:
        return (
            f"experts {self.first_expert}..{self.first_expert + self.num_experts - 1} of {self.num_global_experts}, "
            + super().extra_repr()
        )


def is_expert_param(name: str) -> bool:
    """Parameters sharded over ``ep`` (and reduced over ``dp`` only)."""
    return name.endswith(EXPERT_PARAM_SUFFIXES)


def shard_experts(model: nn.Module, ep_group: object | None, comm: CommStats | None = None) -> CommStats:
    """Replace every MoELayer's experts by this rank's shard and its dispatch by ``ep``.

    ``ep_group`` is a ProcessGroup (None or size 1: the layer keeps all experts but still uses
    the ``ep`` dispatcher, which is then local). Returns the CommStats that all layers add
    their all-to-all bytes to (read and reset it once per step).
    """
    comm = comm or CommStats()
    size = 1 if ep_group is None else dist.get_world_size(ep_group)
    rank = 0 if ep_group is None else dist.get_rank(ep_group)
    ep = EPGroup(group=ep_group, size=size, rank=rank, comm=comm)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        if isinstance(layer.experts, ExpertShard):
            raise ConfigError("shard_experts was called twice on the same model")
        if layer.experts.num_experts % size:
            raise ConfigError(
                f"--ep {size} does not divide moe.num_experts={layer.experts.num_experts}: pick a divisor"
            )
        layer.experts = ExpertShard(layer.experts, ep)
        layer.dispatch = DISPATCHERS["ep"]
    return comm


def _gather_experts(local: Tensor, ep: EPGroup) -> Tensor:
    """``[L, ...]`` on each rank of the ep group → ``[E, ...]`` (concatenated in rank order)."""
    if ep.group is None or ep.size == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(ep.size)]
    dist.all_gather(parts, local.detach().contiguous(), group=ep.group)
    return torch.cat(parts, dim=0)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The ordinary state dict of the unsharded model, on every rank (a collective when ep > 1).

    FSDP2 shards are gathered over their mesh; expert tensors are then all-gathered over their
    ep group; the rest is this rank's copy (equal on all ranks after synchronised steps). Tied weights appear under both names, as in
    ``model.state_dict()``.
    """
    out: dict[str, Tensor] = {}
    shards = {name: mod for name, mod in model.named_modules() if isinstance(mod, ExpertShard)}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):  # an FSDP2 DTensor shard: gather over its mesh first
            tensor = tensor.full_tensor()
        owner = name.rsplit(".", 1)[0]
        if owner in shards:
            out[name] = _gather_experts(tensor, shards[owner].ep)
        else:
            out[name] = tensor.detach().clone()
    return out


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load an unsharded state dict into a (possibly sharded) model: each shard takes its slice."""
    shards = {name: mod for name, mod in model.named_modules() if isinstance(mod, ExpertShard)}
    local: dict[str, Tensor] = {}
    for name, tensor in state.items():
        owner = name.rsplit(".", 1)[0]
        if owner in shards:
            s = shards[owner]
            tensor = tensor[s.first_expert : s.first_expert + s.num_experts]
        local[name] = tensor
    model.load_state_dict(local)

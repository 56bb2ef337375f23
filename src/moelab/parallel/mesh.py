"""The ``dp × ep`` device mesh and the process groups cut from it.

Layout (torchtitan / DeepSpeed-MoE style, EP borrowed from data parallelism): the world of W
ranks is a ``[dp, ep]`` grid, rank = d·ep + e. *Every* rank reads its own slice of the global
batch, so tokens are data-parallel over all W ranks. Non-expert parameters are replicated on
all W ranks (their gradients are reduced over the whole world). Expert parameters are sharded
over ``ep`` (rank e of an ep group holds experts ``[e·E/ep, (e+1)·E/ep)``) and replicated over
``dp`` (their gradients are reduced over the dp group of ranks holding the same experts).
Tokens travel to their experts inside an ep group with all-to-all.

Example, W=4, ep=2: ep groups {0,1} {2,3}; dp groups {0,2} {1,3}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup

from moelab.config import ConfigError
from moelab.parallel.env import DistEnv


@dataclass
class ParallelLayout:
    """Sizes, coordinates and groups of one rank in the ``dp × ep`` mesh.

    Groups are None in a single process (world 1): every reduction is then the identity.
    """

    env: DistEnv
    dp: int
    ep: int
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh, dims ("dp", "ep")
    dp_group: ProcessGroup | None = None
    ep_group: ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return self.dp * self.ep

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def dp_rank(self) -> int:
        return self.env.rank // self.ep

    @property
    def ep_rank(self) -> int:
        return self.env.rank % self.ep

    @property
    def world_group(self) -> ProcessGroup | None:
        """The group non-expert gradients and metrics are reduced over (None = default group)."""
        return None


def check_layout(world_size: int, ep: int, num_experts: int | None) -> int:
    """``dp = world_size / ep`` after checking that ``ep`` divides both W and E."""
    if ep < 1:
        raise ConfigError(f"--ep {ep}: expert-parallel size must be >= 1")
    if world_size % ep:
        raise ConfigError(
            f"--ep {ep} does not divide the world size {world_size}: pick a divisor of {world_size}"
        )
    if num_experts is not None and num_experts % ep:
        raise ConfigError(
            f"--ep {ep} does not divide moe.num_experts={num_experts}: each rank must hold the same number of experts"
        )
    return world_size // ep


def build_layout(env: DistEnv, ep: int = 1, num_experts: int | None = None) -> ParallelLayout:
    """The mesh for this run; ``init_device_mesh`` creates the dp and ep sub-groups on every rank."""
    dp = check_layout(env.world_size, ep, num_experts)
    if not (dist.is_available() and dist.is_initialized()):
        if env.world_size != 1:
            raise ConfigError(
                f"world size {env.world_size} needs an initialised process group: call init_distributed"
            )
        return ParallelLayout(env=env, dp=1, ep=1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
    return ParallelLayout(
        env=env, dp=dp, ep=ep, mesh=mesh, dp_group=mesh.get_group("dp"), ep_group=mesh.get_group("ep")
    )

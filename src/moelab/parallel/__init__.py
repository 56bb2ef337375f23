"""Distributed training on torch.distributed: torchrun init, dp × ep mesh, DDP/FSDP2, expert parallel.

See docs/distributed.md for the launch commands and the layout.
"""

from moelab.parallel.env import DistEnv, fail_together, init_distributed, launched_by_torchrun, shutdown
from moelab.parallel.expert_parallel import ExpertShard, full_state_dict, load_full_state_dict, shard_experts
from moelab.parallel.mesh import ParallelLayout, build_layout
from moelab.parallel.train_step import StepMetrics, shard_rows, train_step
from moelab.parallel.wrap import DATA_PARALLEL, build_data_parallel, unwrap

__all__ = [
    "DATA_PARALLEL",
    "DistEnv",
    "ExpertShard",
    "ParallelLayout",
    "StepMetrics",
    "build_data_parallel",
    "build_layout",
    "fail_together",
    "full_state_dict",
    "init_distributed",
    "launched_by_torchrun",
    "load_full_state_dict",
    "shard_experts",
    "shard_rows",
    "shutdown",
    "train_step",
    "unwrap",
]

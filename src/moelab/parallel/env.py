"""Process-group initialisation from the torchrun environment, and failing together.

torchrun (``python -m torch.distributed.run``) starts one process per rank and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; this module reads them
(the only place in moelab that reads them) and starts ``torch.distributed`` with NCCL on GPUs
and gloo on CPUs. No home-made launcher or transport.

Why a timeout and a guard: a rank that raises (bad data on one shard, out of memory) leaves the
others blocked in their next collective. The process group gets a finite ``timeout`` so a
blocked collective fails instead of hanging, and :func:`fail_together` turns whatever a rank
sees (its own exception, a peer that closed its connection, a timed-out collective) into one
line naming the rank, then exits non-zero so torchrun stops the job.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from moelab.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, local rank, backend and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, draws progress bars and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.backend != "none"


def launched_by_torchrun() -> bool:
    """True when the torchrun variables are set (``WORLD_SIZE`` alone is not enough)."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE"))


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UserError(
            f"environment variable {name}={value!r} is not an integer: launch with torchrun"
        ) from None


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> DistEnv:
    """Start ``torch.distributed`` from the torchrun environment; a plain process gets world 1.

    ``backend`` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise. Each GPU
    rank uses ``cuda:LOCAL_RANK``. ``timeout_s`` bounds every collective (see module doc).
    """
    if not launched_by_torchrun():
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistEnv(device=device)
    rank, world, local = (
        _env_int("RANK"),
        _env_int("WORLD_SIZE"),
        _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0,
    )
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}: launch with torchrun")
    if timeout_s <= 0:
        raise UserError(f"process-group timeout {timeout_s} s must be > 0")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPUs: "
                "use --nproc-per-node at most the number of GPUs"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local, backend=backend, device=device)


def shutdown() -> None:
    """Destroy the default process group if one is up (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


PEER_FAILURE_HINTS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "peer")


def describe_failure(exc: BaseException, rank: int, world_size: int) -> str:
    """One line for a rank's failure: its own error, or a hint that another rank failed."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (UserError, ValueError)) or not any(h in text.lower() for h in PEER_FAILURE_HINTS):
        return f"moelab: rank {rank} of {world_size} failed: {type(exc).__name__}: {text}"
    return (
        f"moelab: rank {rank} of {world_size} stopped: a collective failed ({text[:200]}); "
        "another rank probably failed or hung first: see its 'moelab: rank' message, if any"
    )


@contextmanager
def fail_together(env: DistEnv, exit_code: int = 1) -> Iterator[None]:
    """Run a rank's work; on any exception print one clear line to stderr and exit.

    Exiting (rather than re-raising into ``destroy_process_group``, which may itself wait on
    peers) closes this rank's connections at once, so peers blocked in a collective fail fast
    instead of waiting for the timeout; torchrun then stops the remaining ranks.
    """
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:
        print(describe_failure(exc, env.rank, env.world_size), file=sys.stderr, flush=True)
        if os.environ.get("MOELAB_DEBUG"):
            import traceback

            traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(exit_code)

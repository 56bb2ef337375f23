"""Start W worker processes the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

A plain launcher keeps the multi-process tests cheap (no agent process); the failure test uses
real torchrun. Each worker runs ``dist_workers.py SCENARIO ARGS...`` and exits 0 only when its
checks pass; its stderr carries the assertion that failed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).with_name("dist_workers.py")
SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(WORKERS.parent.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra or {})
    return env


def run_world(world: int, *args: str, timeout: float = 90.0) -> list[subprocess.CompletedProcess]:
    """Run ``dist_workers.py *args`` on ``world`` ranks; kill all if any exceeds ``timeout`` (a hang)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = worker_env(
            {
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKERS), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def assert_all_ok(results: list[subprocess.CompletedProcess]) -> None:
    bad = [(r, res) for r, res in enumerate(results) if res.returncode != 0]
    assert not bad, "\n".join(f"rank {r} exit {res.returncode}:\n{res.stderr[-3000:]}" for r, res in bad)

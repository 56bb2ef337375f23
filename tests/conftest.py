"""Fixtures for every test: a fixed seed, CPU only; one share of the cores per pytest-xdist worker."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under ``pytest -n N`` each worker takes cores/N intra-op threads: N workers of the default thread
    count would ask for N× the cores, and oversubscribed OpenMP threads spin instead of working.
    A test that needs a given count still sets it itself (and restores it)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

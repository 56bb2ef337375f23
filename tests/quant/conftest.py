"""Every quant test runs twice: on moelab's native CPU kernels (where they build) and on PyTorch's."""

from __future__ import annotations

import pytest

from moelab.native import build


@pytest.fixture(autouse=True, params=["native", "aten"])
def kernel_backend(request, monkeypatch) -> str:
    if request.param == "aten":
        monkeypatch.setenv(build.ENV_SWITCH, "0")
    build.reset()
    if request.param == "native" and build.library() is None:
        pytest.skip(f"native kernels unavailable: {build.unavailable_reason()}")
    yield request.param
    monkeypatch.undo()
    build.reset()

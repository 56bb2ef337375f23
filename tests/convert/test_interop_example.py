"""The end-to-end example of docs/interop.md runs and its assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

DOC = Path(__file__).resolve().parents[2] / "docs" / "interop.md"


def test_interop_doc_example_runs() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## End to end")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    assert namespace["mixtral"].config.num_local_experts == 4

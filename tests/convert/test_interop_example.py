"""The end-to-end example of docs/interop.md runs as written and its assertions hold.

The doc's ```python blocks are executed and its ```bash block's ``moelab …`` commands are run
through ``moelab.cli.main``, in order, in a temporary folder; then the test checks that
``moelab train --init`` really started from the upcycled weights and trained them.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from moelab.cli import main
from moelab.convert.hf import load_moelab
from moelab.convert.load import load_model

DOC = Path(__file__).resolve().parents[2] / "docs" / "interop.md"


def doc_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of the end-to-end section, in order."""
    section = DOC.read_text(encoding="utf-8").split("## End to end")[1].split("\n## ")[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, re.S)


def shell_commands(script: str) -> list[list[str]]:
    """The commands of a bash block: comments dropped, backslash continuations joined."""
    joined = re.sub(r"\\\n", " ", script)
    return [
        shlex.split(line)
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_interop_doc_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = doc_blocks()
    assert [lang for lang, _ in blocks] == ["python", "bash", "python"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    namespace: dict = {}
    commands = []
    for lang, code in blocks:
        if lang == "python":
            exec(compile(code, str(DOC), "exec"), namespace)
            continue
        for argv in shell_commands(code):
            assert argv[0] == "moelab", argv
            commands.append(argv[1])
            assert main(argv[1:]) == 0, argv
    assert commands == ["convert", "upcycle", "train", "convert"]
    assert namespace["mixtral"].config.num_local_experts == 4
    assert torch.allclose(namespace["ours"], namespace["theirs"], atol=1e-4)

    # the run started from the upcycled weights (close to them) and changed them (it trained)
    upcycled = load_moelab(tmp_path / "moe").state_dict()
    trained, _ = load_model(tmp_path / "run")
    diffs = [
        float((v - upcycled[k]).abs().max()) for k, v in trained.state_dict().items() if v.is_floating_point()
    ]
    assert max(diffs) > 0
    assert max(diffs) < 0.02  # 5 AdamW steps of lr 1e-3 move a weight by about 5e-3; a fresh init by far more
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps) == 5

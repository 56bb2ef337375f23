"""The house's layers and its no-cycle rule (pyproject.toml [tool.importlinter], docs/design.md) hold on the
tree, and the contracts do catch what they forbid: the same contracts run on a copy of the package with one
deliberately bad import fail, naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def lint(cwd: Path, src: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([*LINT, "--no-cache", "--no-logo"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_its_contracts() -> None:
    out = lint(ROOT, ROOT / "src")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BROKEN" not in out.stdout and out.stdout.count("KEPT") == 2


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the package and of pyproject.toml (the contracts), nothing else."""
    shutil.copytree(ROOT / "src" / "moelab", tmp_path / "src" / "moelab",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "templates"))  # fmt: skip
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _add(path: Path, line: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + f"\n\ndef _bad() -> None:\n    {line}\n", encoding="utf-8")


def test_an_import_against_the_layers_is_caught(copy: Path) -> None:
    """A function-level import counts: the model layer reaching up into training breaks the layers."""
    _add(copy / "src/moelab/model/transformer.py", "from moelab.train.trainer import Trainer  # noqa")
    out = lint(copy, copy / "src")
    assert out.returncode != 0
    assert "moelab's layers BROKEN" in out.stdout and "moelab.model.transformer -> moelab.train.trainer" in out.stdout


def test_a_new_cycle_between_siblings_is_caught(copy: Path) -> None:
    """Two modules of one package importing each other (allowed by the layers: same package) break the cycle rule."""
    _add(copy / "src/moelab/nn/activations.py", "from moelab.nn.ffn import DenseMLP  # noqa")
    out = lint(copy, copy / "src")
    assert out.returncode != 0
    assert "no import cycles between sibling modules or packages BROKEN" in out.stdout
    assert "moelab.nn" in out.stdout

"""The command line: help for every command, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moelab.cli import COMMANDS, main


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage: moelab" in capsys.readouterr().out


def test_config_command_prints_counts(capsys) -> None:
    assert main(["config", "--preset", "smoke", "--set", "moe.num_experts=8"]) == 0
    out = capsys.readouterr().out
    assert "num_experts: 8" in out and "active/token" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["config", "--set", "moe.bogus=1"], "unknown key 'moe.bogus'"),
        (["config", "--preset", "nope"], "unknown preset 'nope'"),
        (["config", "--config", "/nonexistent.yaml"], "does not exist"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(argv: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "moelab", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "moelab", "--debug", "config", "--preset", "nope"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_routers_command_lists_the_registry(capsys) -> None:
    assert main(["routers"]) == 0
    out = capsys.readouterr().out
    assert "topk" in out and "loop" in out and "load_balance" in out


def test_a_reader_that_leaves_the_pipe_ends_the_command_quietly(tmp_path, monkeypatch, capsys) -> None:
    """`moelab routers | head -1`: when the reader has gone (BrokenPipeError on write) the command stops with the
    status a shell expects (141), no traceback, and its stdout pointed at /dev/null for Python's exit flush."""
    import sys

    class GonePipe:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

        def fileno(self) -> int:
            return self.f.fileno()

    with open(tmp_path / "stdout", "w") as f:
        monkeypatch.setattr(sys, "stdout", GonePipe(f))
        assert main(["routers"]) == 141
    assert "Traceback" not in capsys.readouterr().err

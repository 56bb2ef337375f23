"""moelab.outputs: what a crashed process left (``.tmp-NAME-PID``) is swept by the next write into the
same folder, and nothing else is: not a live process's temporary, not a fresh one, not a user's file;
time-named outputs get a fresh name instead of replacing an earlier one (issue 25)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from moelab.outputs import (
    STALE_AFTER_S,
    atomic_write_text,
    clean_stale_temporaries,
    files_kind,
    fresh_stem,
    staged_folder,
)


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The PID of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path, seconds: float) -> None:
    """Make ``path`` and everything in it look untouched for ``seconds``."""
    then = time.time() - seconds
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (then, then), follow_symlinks=False)


def _leftovers(folder, dead_pid: int) -> dict[str, object]:
    """A crash's leftovers beside user files: staged folders, a half-deleted folder, a temporary file."""
    made = {}
    for name in (f".tmp-model-{dead_pid}", f".tmp-old-model-{dead_pid}"):
        (folder / name).mkdir()
        (folder / name / "model.safetensors").write_bytes(b"half")
        made[name] = folder / name
    (folder / f".tmp-report.html-{dead_pid}").write_text("half")
    made[f".tmp-report.html-{dead_pid}"] = folder / f".tmp-report.html-{dead_pid}"
    for p in made.values():
        _age(p, STALE_AFTER_S + 60)
    return made


def test_a_write_sweeps_a_dead_process_temporaries_and_nothing_else(tmp_path, dead_pid) -> None:
    _leftovers(tmp_path, dead_pid)
    keep = {
        f".tmp-fresh-{dead_pid}": "dead but touched a moment ago: perhaps a writer on another machine",
        f".tmp-live-{os.getppid()}": "its process runs",
        ".tmp-notes": "no PID: not a name moelab makes",
        f"tmp-model-{dead_pid}": "not a temporary",
        "notes.txt": "a user's file",
    }
    for name, text in keep.items():
        (tmp_path / name).write_text(text)
        if name != f".tmp-fresh-{dead_pid}":
            _age(tmp_path / name, STALE_AFTER_S + 60)
    atomic_write_text(tmp_path / "report.html", "<html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "report.html"])
    assert all((tmp_path / name).read_text() == text for name, text in keep.items())


def test_staging_a_folder_sweeps_its_parent(tmp_path, dead_pid) -> None:
    made = _leftovers(tmp_path, dead_pid)
    with staged_folder(tmp_path / "model", files_kind("model folder", ("model.safetensors",))) as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
    assert not any(p.exists() for p in made.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_sweeping_is_reported_and_bounded_by_age(tmp_path, dead_pid) -> None:
    made = _leftovers(tmp_path, dead_pid)
    assert clean_stale_temporaries(tmp_path, stale_after_s=10 * STALE_AFTER_S) == []
    assert sorted(clean_stale_temporaries(tmp_path)) == sorted(made.values())
    assert clean_stale_temporaries(tmp_path / "missing") == []


def test_fresh_stem_never_reuses_a_taken_name(tmp_path) -> None:
    assert fresh_stem(tmp_path, "bench-20300101-1200", (".json", ".md")) == "bench-20300101-1200"
    (tmp_path / "bench-20300101-1200.md").write_text("an earlier run")  # either file takes the name
    assert fresh_stem(tmp_path, "bench-20300101-1200", (".json", ".md")) == "bench-20300101-1200-2"
    (tmp_path / "bench-20300101-1200-2.json").write_text("another")
    assert fresh_stem(tmp_path, "bench-20300101-1200", (".json", ".md")) == "bench-20300101-1200-3"

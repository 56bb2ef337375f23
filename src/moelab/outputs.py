"""Output folders: the one rule every command that writes follows, so that nothing is lost.

The rule: **a command never deletes or overwrites what it did not create.**

- *Claim before work.* An output folder that exists and is not empty is refused, with one line
  naming the flags that would accept it (``--resume`` to continue a run, ``--overwrite`` to replace
  it), before any slow work starts (:func:`check_output`).
- *Overwrite deletes only moelab's own.* With ``overwrite``, every entry of the folder must be one
  the output's :class:`OutputKind` recognises as written by moelab (a checkpoint with its completion
  marker, ``metrics.jsonl``, a model folder's files); a folder holding anything else is refused,
  naming one such entry. Only the recognised entries are deleted.
- *Never onto the input.* An output equal to, inside, or holding one of the command's sources is
  refused even with ``overwrite``: writing it would destroy what is being read (:func:`refuse_overlap`).
- *Atomic.* A whole output (a model folder, a checkpoint) is written into a temporary sibling
  ``.tmp-NAME-PID``, fsync'd, then renamed into place (:func:`staged_folder`); a crash leaves the
  old output or the new one, never a mix, plus a temporary every reader ignores. Deleting goes the
  other way round (:func:`discard`): rename out of the way first, then remove, so a half-deleted
  folder never sits under a real name.
- *Crash leftovers are swept.* A later write into the same folder removes the temporaries a dead
  process left there (:func:`clean_stale_temporaries`): only names of this module's pattern whose
  PID is not running on this machine and that nothing has touched for :data:`STALE_AFTER_S`.

Why one module: each command used to decide on its own (``rmtree`` here, ``mkdir(exist_ok=True)``
there) and the differences were where data was lost. This module knows nothing about checkpoints
or models; the modules that define a format declare its :class:`OutputKind`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import UserError

TMP_PREFIX = ".tmp-"  # temporaries (being written, or being deleted): readers skip them
STALE_AFTER_S = 3600.0  # a dead process's temporary untouched this long is swept (clean_stale_temporaries)


@dataclass(frozen=True)
class OutputKind:
    """What a command writes into its output folder.

    ``name`` is used in messages ("a model folder"); ``foreign(entry)`` is given one entry of the
    folder and returns the first path in it that moelab did not write as this kind, or None when
    the whole entry is moelab's own (and may be deleted by ``overwrite``).
    """

    name: str
    foreign: Callable[[Path], Path | None]


def files_kind(name: str, files: Iterable[str]) -> OutputKind:
    """An :class:`OutputKind` whose folder holds only plain files with these names."""
    allowed = frozenset(files)

    def foreign(entry: Path) -> Path | None:
        return None if entry.name in allowed and entry.is_file() and not entry.is_symlink() else entry

    return OutputKind(name, foreign)


def first_foreign(folder: Path, kind: OutputKind) -> Path | None:
    """The first entry (in name order) of ``folder`` that moelab did not write as ``kind``, or None."""
    for entry in sorted(folder.iterdir()):
        bad = kind.foreign(entry)
        if bad is not None:
            return bad
    return None


def is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


# ----------------------------------------------------------------------------- sources


def overlaps(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` are the same folder or one lies inside the other (symlinks resolved)."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)


def refuse_overlap(out: str | Path, sources: Iterable[str | Path]) -> None:
    """Refuse an output that is, lies inside, or holds a source: writing it would destroy the input."""
    for src in sources:
        if not overlaps(out, src):
            continue
        ro, rs = Path(out).resolve(), Path(src).resolve()
        where = "is" if ro == rs else ("lies inside" if ro.is_relative_to(rs) else "holds")
        raise UserError(
            f"the output folder {out} {where} the source {src}: writing it would destroy what is being read; "
            "give an output folder outside the source"
        )


# ----------------------------------------------------------------------------- claiming


def check_output(
    out: str | Path,
    kind: OutputKind,
    *,
    overwrite: bool = False,
    sources: Iterable[str | Path] = (),
    hint: str | None = None,
) -> Path:
    """Refuse ``out`` when writing ``kind`` there could lose data; return it as a Path. Deletes nothing.

    Accepted: a missing path, an empty folder, and (``overwrite``) a folder whose every entry is
    moelab's own ``kind``. ``hint`` replaces the default advice in the "not empty" message.
    """
    path = Path(out)
    refuse_overlap(path, sources)
    if path.exists() and not path.is_dir():
        raise UserError(f"the output {path} is a file, not a folder: give a folder to write the {kind.name} to")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not overwrite:
        advice = hint or "give another folder, or pass --overwrite to replace it"
        raise UserError(f"the output folder {path} already exists and is not empty: {advice}")
    bad = first_foreign(path, kind)
    if bad is not None:
        raise UserError(
            f"--overwrite: {path} holds {bad.relative_to(path)}, which moelab did not write as a {kind.name}; "
            "moelab deletes only its own outputs: move it away or give another folder"
        )
    return path


def clear_output(out: str | Path, kind: OutputKind) -> None:
    """Delete the entries of ``out`` that are moelab's own ``kind`` (after :func:`check_output` accepted it)."""
    path = Path(out)
    if not path.is_dir():
        return
    for entry in sorted(path.iterdir()):
        if kind.foreign(entry) is None:
            discard(entry)


def discard(path: Path) -> None:
    """Delete ``path``: renamed to a temporary first, so a crash never leaves it half-deleted under its name."""
    if not path.exists() and not path.is_symlink():
        return
    gone = _fresh(temporary_sibling(path, "old-"))
    os.rename(path, gone)
    _remove(gone)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fresh(path: Path) -> Path:
    """``path`` with anything left there by an earlier crash of a process with this pid removed."""
    if path.exists() or path.is_symlink():
        _remove(path)
    return path


# ----------------------------------------------------------------------------- atomic writes


def temporary_sibling(path: Path, tag: str = "") -> Path:
    """``.tmp-[TAG]NAME-PID`` beside ``path``: unique to this process, skipped by every reader."""
    return path.parent / f"{TMP_PREFIX}{tag}{path.name}-{os.getpid()}"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new names, renames) durable; a no-op where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            fsync_file(p)
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(folder)


@contextmanager
def staged_folder(
    out: str | Path,
    kind: OutputKind,
    *,
    overwrite: bool = False,
    sources: Iterable[str | Path] = (),
    hint: str | None = None,
) -> Iterator[Path]:
    """Write the folder ``out`` atomically: yield an empty temporary sibling to write into.

    On entry ``out`` is checked (:func:`check_output`); when the block finishes, the temporary is
    fsync'd, ``out`` is checked again (it may have appeared meanwhile) and the temporary is renamed
    to ``out``, replacing an accepted old output. If the block raises, the temporary is removed and
    ``out`` is untouched.
    """
    final = Path(out)
    sources = list(sources)
    check_output(final, kind, overwrite=overwrite, sources=sources, hint=hint)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final.parent)
    tmp = _fresh(temporary_sibling(final))  # a leftover with this very pid is ours
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        check_output(final, kind, overwrite=overwrite, sources=sources, hint=hint)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an old ``final`` is moved aside first and deleted after."""
    if not final.exists():
        os.rename(tmp, final)
        return
    if is_empty_folder(final):
        final.rmdir()
        os.rename(tmp, final)
        return
    old = _fresh(temporary_sibling(final, "old-"))
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old, final)  # put the old output back: never leave neither
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` in one step (temporary sibling, fsync, rename)."""
    final = Path(path)
    clean_stale_temporaries(final.parent)
    tmp = _fresh(temporary_sibling(final))
    try:
        tmp.write_bytes(data)
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace the file ``path`` with ``text`` (UTF-8) in one step (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fresh_stem(folder: str | Path, stem: str, suffixes: Sequence[str]) -> str:
    """``stem``, else ``stem-2``, ``stem-3``, …: the first for which no ``folder/STEM+SUFFIX`` exists.

    For outputs named by the time they were made (``bench-YYYYMMDD-HHMM``): two runs in one minute
    get two names instead of the second replacing the first's files.
    """
    n = 1
    while True:
        name = stem if n == 1 else f"{stem}-{n}"
        if not any(os.path.lexists(Path(folder) / f"{name}{suffix}") for suffix in suffixes):
            return name
        n += 1


# ----------------------------------------------------------------------------- crash leftovers


def _temporary_pid(name: str) -> int | None:
    """The PID in a temporary's name ``.tmp-[TAG]NAME-PID`` (:func:`temporary_sibling`), else None."""
    if not name.startswith(TMP_PREFIX):
        return None
    _, dash, pid = name.rpartition("-")
    return int(pid) if dash and pid.isdigit() and len(name) > len(TMP_PREFIX) + len(pid) + 1 else None


def _pid_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine; True wherever that cannot be known."""
    if os.name != "posix" or pid == os.getpid():
        return True  # (on Windows, os.kill(pid, 0) would send CTRL_C_EVENT)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def _last_touched(path: Path) -> float:
    """The newest modification time of ``path`` and (for a folder) of everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for p in path.rglob("*"):
            try:
                newest = max(newest, p.lstat().st_mtime)
            except OSError:
                continue
    return newest


def clean_stale_temporaries(folder: str | Path, *, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporaries a crashed process left in ``folder``; return what was removed.

    A temporary is swept only when all of these hold: its name is this module's
    (``.tmp-[TAG]NAME-PID``, so moelab wrote it), its PID is not running on this machine, and
    nothing in it changed for ``stale_after_s`` seconds. Why the age too: a PID that looks dead
    may be a live writer on another machine sharing the folder (a network file system) or in
    another PID namespace (containers sharing a volume); such a writer keeps touching its files.
    Best effort: what cannot be removed stays (readers skip temporaries anyway).
    """
    path = Path(folder)
    removed: list[Path] = []
    try:
        entries = sorted(path.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        pid = _temporary_pid(entry.name)
        if pid is None or _pid_running(pid):
            continue
        try:
            if now - _last_touched(entry) < stale_after_s:
                continue
            _remove(entry)
        except OSError:
            continue
        removed.append(entry)
    return removed

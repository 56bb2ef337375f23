"""Reading a text file a user named, with one clear error for each way it can be wrong.

Why: ``Path.read_text`` turns a binary file into a ``UnicodeDecodeError`` traceback, and an
``is_file()`` check reports a directory or a device such as ``/dev/null`` as "does not exist".
A user should read what the path actually is, and for bad bytes where they are, so they can
fix the file. The caller chooses the exception class (``ConfigError`` for config files,
``UserError`` for other inputs), so this module imports nothing from moelab and sits at the
bottom of the layers.
"""

from __future__ import annotations

import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def path_problem(path: Path) -> str | None:
    """Why ``path`` is not a regular file one can read text from, or None when it is one."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"is not a regular file (it is {kind})"


def read_text_file(path: str | Path, what: str, error: type[Exception], hint: str = "") -> str:
    """The UTF-8 text of ``path``, or ``error`` naming ``what`` (e.g. "config file") and the problem.

    Problems: missing, not a regular file (directory, device, pipe), unreadable, not UTF-8
    (the first bad byte and its offset), or holding NUL bytes (a binary file that happens to
    decode). Emptiness is the caller's to judge: an empty prompt file and an empty config file
    need different advice. ``hint`` (what to pass instead) ends the message where the path is
    the wrong kind of thing.
    """
    p = Path(path)
    tail = f": {hint}" if hint else ""
    problem = path_problem(p)
    if problem is not None:
        raise error(f"{what} {str(p)!r} {problem}{tail}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise error(f"{what} {str(p)!r} cannot be read: {exc.strerror or exc}{tail}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} {str(p)!r} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            "cannot be decoded (a binary file, or text in another encoding: save it as UTF-8)"
        ) from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise error(f"{what} {str(p)!r} is not text: a NUL byte at offset {nul} (a binary file?){tail}")
    return text


__all__ = ["path_problem", "read_text_file"]

"""Compile moelab's C kernels once per machine and load them with ctypes.

Why C through ctypes and not a PyTorch C++ extension: the kernels are plain loops over raw
buffers (no ATen types), so a C compiler builds them in a fraction of a second, where an
extension that includes torch's headers takes most of a minute. ``-march=native`` lets the
compiler use what this CPU has (AVX-512 here), so the build is cached per (source, compiler,
CPU flags) under ``$MOELAB_CACHE/native/`` and written atomically.

Nothing depends on it: without a C compiler, on a build failure, or with ``MOELAB_NATIVE=0``
:func:`library` returns None (the reason is in :func:`unavailable_reason`) and the quantized
layers use PyTorch's kernels instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from moelab.cache import cache_dir
from moelab.hardware import cpu_flags

HERE = Path(__file__).parent
SOURCES = (HERE / "qmatmul.c", HERE / "decode.c", HERE / "attention.c")  # compiled into one library
HEADERS = (HERE / "blocks.h", HERE / "steps.h")
VERSION = 8  # must equal moelab_native_version() in qmatmul.c
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
LIBS = ("-lm",)
ENV_SWITCH = "MOELAB_NATIVE"  # "0" turns the kernels off

_reason: str | None = None


def compiler() -> str | None:
    """``$CC``, else ``cc`` or ``gcc`` on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(out: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile :data:`SOURCES` into the shared library ``out`` (atomically); raises on failure."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *FLAGS, *extra_flags, f"-I{HERE}", *map(str, SOURCES), *LIBS, "-o", tmp],
            capture_output=True, text=True, timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed: {result.stderr.strip()[:2000]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _cache_key(extra_flags: tuple[str, ...]) -> str:
    h = hashlib.sha256(b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS)))
    h.update(" ".join((str(compiler()), *FLAGS, *LIBS, *extra_flags, platform.machine())).encode())
    h.update(" ".join(sorted(cpu_flags())).encode())
    return h.hexdigest()[:16]


def load(path: Path) -> ctypes.CDLL:
    """Open a built library and declare its entry points' argument types."""
    lib = ctypes.CDLL(str(path))
    if lib.moelab_native_version() != VERSION:
        raise RuntimeError(f"{path} is version {lib.moelab_native_version()}, expected {VERSION}")
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.moelab_q8_matmul.argtypes = [p, p, p, p, i, i, i, i, i]
    lib.moelab_q4_matmul.argtypes = [p, p, i, p, p, i, i, i, i, i, i]
    lib.moelab_bf16_matmul.argtypes = [p, p, p, i, i, i, i]
    lib.moelab_f32_matmul.argtypes = [p, p, p, i, i, i, i]
    lib.moelab_ffn_vec.argtypes = [p, p, p, p, i, i]
    lib.moelab_moe_vec.argtypes = [p, p, p, i, i, i, p, p, p, p, i, i]
    f = ctypes.c_float
    lib.moelab_ffn_res.argtypes = [p, p, p, f, p, i, i]
    lib.moelab_moe_res.argtypes = [p, p, p, i, i, i, p, p, p, f, p, p, p, i, i]
    lib.moelab_moe_rows.argtypes = [p, p, i, i, i, p, p, p, p, p, i, i]
    lib.moelab_attn_res.argtypes = [p, p, p, p, p, p, i, i, i, i]
    return lib


@functools.cache
def library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None when they cannot be had here (see module doc)."""
    global _reason
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _reason = f"turned off by {ENV_SWITCH}=0"
        return None
    path = cache_dir() / "native" / _cache_key(extra_flags) / "libmoelab_qmatmul.so"
    try:
        if not path.exists():
            build(path, extra_flags)
        return load(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _reason = str(exc)
        warnings.warn(
            f"moelab's native int8/int4 kernels are unavailable ({exc}); using PyTorch's kernels "
            f"(slower decoding). Set {ENV_SWITCH}=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def describe() -> dict[str, object]:
    """What the loaded library uses, for benchmark records: available, and if so its SIMD width and
    whether it has bf16 and integer (VNNI) dot products; else why not."""
    lib = library()
    if lib is None:
        return {"available": False, "reason": _reason}
    return {
        "available": True,
        "simd_bits": lib.moelab_native_simd_bits(),
        "bf16_dot": bool(lib.moelab_native_bf16_dot()),
        "vnni": bool(lib.moelab_native_vnni()),
    }


def unavailable_reason() -> str | None:
    """Why :func:`library` returned None (None when it did not)."""
    return _reason


_ON_RESET: list[Callable[[], None]] = []  # callers' caches of choices made from the library (quant.kernels)


def on_reset(forget: Callable[[], None]) -> None:
    """Call ``forget`` whenever :func:`reset` runs: a layer above that cached a choice made from the library
    registers here, so native imports nothing of it."""
    _ON_RESET.append(forget)


def reset() -> None:
    """Forget the loaded library and every kernel choice made from it (after changing ``MOELAB_NATIVE``)."""
    global _reason
    _reason = None
    library.cache_clear()
    for forget in _ON_RESET:
        forget()

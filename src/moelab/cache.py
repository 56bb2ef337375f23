"""Where moelab keeps what it builds once and reuses: corpora, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MOELAB_CACHE``, else ``$XDG_CACHE_HOME/moelab``, else ``~/.cache/moelab`` (documented env vars)."""
    root = os.environ.get("MOELAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moelab"
    )
    return Path(root)

"""Errors a user can act on. The CLI prints their message as one line and exits with code 2."""

from __future__ import annotations

from moelab.config import ConfigError


class UserError(Exception):
    """Bad input that is not a config field: a missing file, a damaged checkpoint, bad data."""


__all__ = ["ConfigError", "UserError"]

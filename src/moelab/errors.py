"""Errors a user can act on. The CLI prints their message as one line and exits with code 2.

The lowest module of the package (it imports nothing of moelab): every layer may raise these.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what is allowed."""


class UserError(Exception):
    """Bad input that is not a config field: a missing file, a damaged checkpoint, bad data."""


__all__ = ["ConfigError", "UserError"]

"""Dispatch backends: move tokens to experts, run them, combine the outputs.

A backend is a function ``(x_TD, decision, experts) -> y_TD`` registered by name. It knows
nothing of routing math: it reads assignments, ``kept`` and combine weights from the decision.
``loop`` is the reference every faster backend is tested against.
"""

from __future__ import annotations

from moelab.moe.dispatch import ep as _ep  # noqa: F401  (registers "ep")
from moelab.moe.dispatch import loop as _loop  # noqa: F401  (registers "loop")
from moelab.moe.dispatch.base import DISPATCHERS, DispatchFn

__all__ = ["DISPATCHERS", "DispatchFn"]

"""Dispatch backends: move tokens to experts, run them, combine the outputs.

A backend is a function ``(x_TD, decision, experts) -> y_TD`` registered by name. It knows
nothing of routing math: it reads assignments, ``kept`` and combine weights from the decision.
``loop`` is the reference every faster backend is tested against; ``auto`` picks the fastest
measured backend for the device, dtype and shape.
"""

from __future__ import annotations

from moelab.moe.dispatch import auto as _auto  # noqa: F401  (registers "auto")
from moelab.moe.dispatch import ep as _ep  # noqa: F401  (registers "ep")
from moelab.moe.dispatch import grouped_mm as _grouped_mm  # noqa: F401  (registers "grouped_mm")
from moelab.moe.dispatch import loop as _loop  # noqa: F401  (registers "loop")
from moelab.moe.dispatch import padded as _padded  # noqa: F401  (registers "padded")
from moelab.moe.dispatch import sorted as _sorted  # noqa: F401  (registers "sorted")
from moelab.moe.dispatch.base import DISPATCHERS, DispatchFn

__all__ = ["DISPATCHERS", "DispatchFn"]

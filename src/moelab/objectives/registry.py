"""The objective registry: name → :class:`~moelab.objectives.base.Objective` subclass."""

from __future__ import annotations

from moelab.registry import Registry

OBJECTIVES: Registry = Registry("objective")

"""Dispatch backend interface and registry.

Legend: T tokens, D model dim, A assignments.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from moelab.moe.decision import RoutingDecision
from moelab.moe.experts import Experts
from moelab.registry import Registry

DispatchFn = Callable[[Tensor, RoutingDecision, Experts], Tensor]
DISPATCHERS: Registry[DispatchFn] = Registry("dispatch backend")

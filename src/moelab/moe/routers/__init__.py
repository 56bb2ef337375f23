"""Router registry. One file per router family; adding one is one file plus one import line.

Every router maps ``x_TD`` (and optionally token ids) to a :class:`RoutingDecision`, computing
its math in fp32 whatever the model dtype.
"""

from __future__ import annotations

from moelab.moe.routers import expert_choice as _expert_choice  # noqa: F401  (registers "expert_choice")
from moelab.moe.routers import hash as _hash  # noqa: F401  (registers "hash")
from moelab.moe.routers import noisy_topk as _noisy_topk  # noqa: F401  (registers "noisy_topk")
from moelab.moe.routers import sigmoid_bias as _sigmoid_bias  # noqa: F401  (registers "sigmoid_bias")
from moelab.moe.routers import switch as _switch  # noqa: F401  (registers "switch")
from moelab.moe.routers import topk as _topk  # noqa: F401  (registers "topk")
from moelab.moe.routers import topk_unweighted as _topk_unweighted  # noqa: F401  (registers "topk_unweighted")
from moelab.moe.routers.base import ROUTERS, Router, build_router

__all__ = ["ROUTERS", "Router", "build_router"]

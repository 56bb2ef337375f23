"""Balancing outside the gradient: an explicit trainer step, never a side effect of forward.

Routers that balance by adjusting a per-expert bias (DeepSeek-V3's aux-loss-free balancing)
implement ``update_bias(layer_stats)``. The trainer calls ``balancer.update(stats)`` once per
optimizer step, between backward and ``optimizer.step()``, with the RoutingStats of that step
(accumulated over micro-batches by :meth:`RoutingStats` addition in the trainer if it wants).
Models without such routers make this a no-op.
"""

from __future__ import annotations

from torch import nn

from moelab.moe.layer import MoELayer
from moelab.moe.stats import RoutingStats


class Balancer:
    """Applies out-of-gradient router updates for every MoE layer of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: dict[int, MoELayer] = {}
        blocks = getattr(model, "blocks", [])
        for i, block in enumerate(blocks):
            if isinstance(getattr(block, "ffn", None), MoELayer) and hasattr(block.ffn.router, "update_bias"):
                self.layers[i] = block.ffn

    @property
    def active(self) -> bool:
        """Whether any router of the model balances by bias."""
        return bool(self.layers)

    def update(self, stats: RoutingStats) -> None:
        for i, layer in self.layers.items():
            if i in stats.layers:
                layer.router.update_bias(stats.layers[i])

"""Mixture-of-experts building blocks: router → capacity → dispatch → experts (+ shared experts)."""

from moelab.moe.decision import RoutingDecision

__all__ = ["RoutingDecision"]

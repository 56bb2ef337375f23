"""Router health: per-layer metrics, dead experts and collapse warnings, for the trainer to log.

Built on :class:`~moelab.moe.stats.RoutingStats` (one step's loads, valid tokens only). The
trainer owns one :class:`RouterHealth` per run and, once per optimizer step::

    stats = RoutingStats.from_routing(out.routing)
    for message in health.observe(step, stats):   # each warning once per layer and kind
        log.warning(message)
    log.scalars(health.metrics(stats))             # "moe/layer{i}/max_load", ...

Per layer and step (``metrics``):
- ``max_load``: largest expert share of the assignments (1/E at balance, 1/K at collapse).
- ``max_token_share``: largest share of tokens that chose one expert (K/E at balance, 1 at collapse).
- ``load_entropy``: entropy of the load normalised by log E (1 = balanced, 0 = one expert).
- ``mean_top1_prob``: mean over tokens of the router's largest score.
- ``drop_rate``: share of assignments dropped by the capacity policy.
- ``dead_experts``: experts that received no assignment in the last ``dead_steps`` steps.

Collapse: one expert chosen by more than ``collapse_share`` of the tokens in every observed
step for ``collapse_steps`` steps. Thresholds come from ``MoEConfig.health_*``.

Legend: E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moelab.config import MoEConfig
from moelab.moe.stats import RoutingStats


@dataclass
class _LayerState:
    """What RouterHealth remembers about one layer between steps."""

    last_used_E: torch.Tensor  # [E] long, last step each expert received an assignment
    collapse_since: int | None = None  # first step of the current run above the collapse share
    warned: set[str] = field(default_factory=set)


class RouterHealth:
    """Tracks routing health across steps; warns once per layer when a router collapses or experts die."""

    def __init__(
        self,
        cfg: MoEConfig | None = None,
        *,
        collapse_share: float | None = None,
        collapse_steps: int | None = None,
        dead_steps: int | None = None,
    ) -> None:
        cfg = cfg if cfg is not None else MoEConfig()
        self.collapse_share = cfg.health_collapse_share if collapse_share is None else collapse_share
        self.collapse_steps = cfg.health_collapse_steps if collapse_steps is None else collapse_steps
        self.dead_steps = cfg.health_dead_steps if dead_steps is None else dead_steps
        self._layers: dict[int, _LayerState] = {}
        self._step = 0

    def observe(self, step: int, stats: RoutingStats) -> list[str]:
        """Record one step's stats; return the new warnings (each layer/kind warns once)."""
        self._step = step
        messages: list[str] = []
        for i, s in stats.layers.items():
            state = self._layers.get(i)
            if state is None:
                state = self._layers[i] = _LayerState(last_used_E=torch.full_like(s.load, step))
            state.last_used_E[s.load > 0] = step
            share_E = s.token_share
            top = int(share_E.argmax()) if share_E.numel() else 0
            if share_E.numel() and float(share_E[top]) > self.collapse_share:
                if state.collapse_since is None:
                    state.collapse_since = step
            else:
                state.collapse_since = None
            if (
                state.collapse_since is not None
                and step - state.collapse_since + 1 >= self.collapse_steps
                and "collapse" not in state.warned
            ):
                state.warned.add("collapse")
                messages.append(
                    f"router collapse in MoE layer {i}: expert {top} took {float(share_E[top]):.0%} of the tokens "
                    f"for {step - state.collapse_since + 1} steps (threshold {self.collapse_share:.0%}); "
                    "raise moe.aux_loss_coef or try another router"
                )
            dead = self.dead_experts(i)
            if dead and "dead" not in state.warned:
                state.warned.add("dead")
                messages.append(
                    f"dead experts in MoE layer {i}: {dead} received no tokens in the last {self.dead_steps} steps"
                )
        return messages

    def dead_experts(self, layer: int) -> list[int]:
        """Experts of ``layer`` without an assignment for at least ``dead_steps`` steps."""
        state = self._layers.get(layer)
        if state is None:
            return []
        idle_E = self._step - state.last_used_E
        return [int(e) for e in torch.nonzero(idle_E >= self.dead_steps).flatten()]

    def collapsed(self, layer: int) -> bool:
        """Whether ``layer`` is in a collapse run of at least ``collapse_steps`` steps now."""
        state = self._layers.get(layer)
        return (
            state is not None
            and state.collapse_since is not None
            and self._step - state.collapse_since + 1 >= self.collapse_steps
        )

    def metrics(self, stats: RoutingStats) -> dict[str, float]:
        """Scalars to log for every layer of ``stats``: ``moe/layer{i}/<metric>``."""
        out: dict[str, float] = {}
        for i, s in sorted(stats.layers.items()):
            prefix = f"moe/layer{i}/"
            out[prefix + "max_load"] = s.max_load
            out[prefix + "max_token_share"] = float(s.token_share.max()) if s.load.numel() else 0.0
            out[prefix + "load_entropy"] = s.load_entropy
            out[prefix + "mean_top1_prob"] = s.mean_top1_prob
            out[prefix + "drop_rate"] = s.drop_rate
            out[prefix + "dead_experts"] = float(len(self.dead_experts(i)))
        return out

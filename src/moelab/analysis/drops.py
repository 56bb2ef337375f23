"""Drops towards the end (OpenMoE; seeds/004): are late tokens dropped more under a capacity?

An expert with capacity C keeps at most C assignments of its capacity group. With the
``position`` policy the earliest assignments win, so when routing is skewed the *late* tokens of
the group overflow their expert and pass through the residual only. OpenMoE saw this hurt long
multilingual and chat inputs. Here: drop rate against position in the capacity group, per layer,
at a chosen capacity factor and policy — also for a model trained dropless (``with_capacity``
imposes a capacity at evaluation time without touching its weights).

The capacity group is the batch the layer sees (``apply_capacity`` flattens ``B·S``
row-major), so the analysis runs one sequence per batch by default: then the group position is
the position in the sequence, as in OpenMoE. With ``rows_per_group > 1`` the x-axis is the
place in the flattened group.

Legend: N tokens, A assignments, E experts, K top-k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from moelab.analysis.trace import Trace
from moelab.errors import UserError
from moelab.moe.capacity import DROP_POLICIES


@contextlib.contextmanager
def with_capacity(model: torch.nn.Module, capacity_factor: float | None, policy: str) -> Iterator[torch.nn.Module]:
    """Temporarily give every MoE layer of ``model`` this capacity factor and drop policy."""
    if policy not in DROP_POLICIES:
        raise UserError(f"unknown drop policy {policy!r}: expected one of {', '.join(map(repr, DROP_POLICIES))}")
    layers = list(getattr(model, "moe_layers", []))
    if not layers:
        raise UserError("the model has no MoE layer: drops need an MoE model")
    saved = [layer.cfg for layer in layers]
    try:
        for layer in layers:
            layer.cfg = replace(layer.cfg, capacity_factor=capacity_factor, drop_policy=policy)
        yield model
    finally:
        for layer, cfg in zip(layers, saved):
            layer.cfg = cfg


def drop_rate_by_position(
    position_A: np.ndarray, kept_A: np.ndarray, group_size: int, buckets: int = 16
) -> dict[str, list[float]]:
    """Drop rate of assignments in ``buckets`` equal slices of the capacity group ``[0, group_size)``."""
    b = np.minimum(position_A.astype(np.int64) * buckets // max(1, group_size), buckets - 1)
    total = np.bincount(b, minlength=buckets).astype(np.float64)
    dropped = np.bincount(b, weights=(~kept_A.astype(bool)).astype(np.float64), minlength=buckets)
    rate = np.divide(dropped, total, out=np.zeros(buckets), where=total > 0)
    centers = ((np.arange(buckets) + 0.5) / buckets).tolist()
    return {"position": centers, "drop_rate": rate.tolist(), "assignments": total.astype(int).tolist()}


def quarter_rates(curve: dict[str, list[float]]) -> tuple[float, float]:
    """Drop rate in the first and the last quarter of the group (assignment-weighted)."""
    rate = np.asarray(curve["drop_rate"])
    n = np.asarray(curve["assignments"], dtype=np.float64)
    q = max(1, len(rate) // 4)

    def avg(sl: slice) -> float:
        return float((rate[sl] * n[sl]).sum() / max(1.0, n[sl].sum()))

    return avg(slice(0, q)), avg(slice(len(rate) - q, None))


def trace_drops(trace: Trace, buckets: int = 16) -> dict[str, Any]:
    """Drop rate against position in the capacity group for every layer of a trace.

    The group of a token is its batch; its place in the group is ``row · S + position``, and the
    group size ``rows · S`` (rows = sequences per batch when the trace was recorded).
    """
    S = int(trace.meta["seq_len"])
    row = trace.array("row").astype(np.int64)
    group_pos_N = row * S + trace.array("position").astype(np.int64)
    rows = int(row.max()) + 1 if row.size else 1
    valid_N = trace.array("valid").astype(bool)
    out: dict[str, Any] = {"group_size": rows * S, "layers": {}}
    for layer in trace.layers:
        la = trace.layer(layer)
        ok = valid_N[la["a_token"]]
        curve = drop_rate_by_position(group_pos_N[la["a_token"]][ok], la["a_kept"][ok], rows * S, buckets)
        first, last = quarter_rates(curve)
        out["layers"][str(layer)] = {**curve, "first_quarter": first, "last_quarter": last}
    return out

"""Expert-cache policies: which resident expert to evict, and whether to keep a fetched one.

Registered by name in ``CACHE_POLICIES`` (``--cache-policy``): ``lru``; ``lfu`` (calibration
routing counts plus online uses); ``pinned`` (a fixed hot set from the calibration trace).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from moelab.registry import Registry


class CachePolicy:
    """Which resident expert to evict, and whether a fetched expert is kept at all."""

    def __init__(self, capacity: int, counts_E: list[float] | None) -> None:
        self.capacity = capacity
        self.counts = list(counts_E) if counts_E is not None else None
        self.order: OrderedDict[int, None] = OrderedDict()  # recency, oldest first

    def initial(self) -> list[int]:
        """Experts to load before the first token."""
        return []

    def admit(self, expert: int) -> bool:
        return True

    def touch(self, expert: int) -> None:
        """``expert`` was used."""
        self.order[expert] = None
        self.order.move_to_end(expert)

    def inserted(self, expert: int) -> None:
        """``expert`` became resident (a prefetch is recent, but not a use)."""
        self.order[expert] = None
        self.order.move_to_end(expert)

    def forget(self, expert: int) -> None:
        self.order.pop(expert, None)

    def victim(self, resident: Iterable[int], protected: set[int]) -> int | None:
        raise NotImplementedError


CACHE_POLICIES: Registry[type[CachePolicy]] = Registry("expert cache policy")


@CACHE_POLICIES.register("lru")
class LRUPolicy(CachePolicy):
    """Evict the least recently used expert."""

    def victim(self, resident: Iterable[int], protected: set[int]) -> int | None:
        allowed = set(resident) - protected
        never_touched = sorted(allowed - set(self.order))
        return never_touched[0] if never_touched else next((e for e in self.order if e in allowed), None)


@CACHE_POLICIES.register("lfu")
class LFUPolicy(CachePolicy):
    """Evict the least frequently used expert: calibration counts plus uses in this run
    (ties: least recently used)."""

    def __init__(self, capacity: int, counts_E: list[float] | None) -> None:
        super().__init__(capacity, counts_E)
        self.freq: dict[int, float] = dict(enumerate(self.counts or []))

    def touch(self, expert: int) -> None:
        super().touch(expert)
        self.freq[expert] = self.freq.get(expert, 0.0) + 1.0

    def victim(self, resident: Iterable[int], protected: set[int]) -> int | None:
        recency = {e: i for i, e in enumerate(self.order)}
        allowed = [e for e in resident if e not in protected]
        if not allowed:
            return None
        return min(allowed, key=lambda e: (self.freq.get(e, 0.0), recency.get(e, -1)))


@CACHE_POLICIES.register("pinned")
class PinnedPolicy(CachePolicy):
    """A fixed hot set: the ``capacity`` experts most used in calibration (lowest ids without
    a trace) are resident for the whole run; others are streamed for each use."""

    def __init__(self, capacity: int, counts_E: list[float] | None) -> None:
        super().__init__(capacity, counts_E)
        counts = self.counts or []
        ranked = sorted(range(len(counts)), key=lambda e: (-counts[e], e)) if counts else []
        self.hot = ranked[:capacity]

    def initial(self) -> list[int]:
        return list(self.hot)

    def admit(self, expert: int) -> bool:
        return expert in self.hot

    def victim(self, resident: Iterable[int], protected: set[int]) -> int | None:
        return None


__all__ = ["CACHE_POLICIES", "CachePolicy", "LFUPolicy", "LRUPolicy", "PinnedPolicy"]

"""Expert offloading: routed experts live off the compute device and are fetched on demand into
a bounded per-layer cache.

Why: an MoE token reads only its K active experts, so most expert bytes can stay in slower
memory (CPU RAM, or a memory-mapped safetensors file) while attention, norms, routers and
shared experts stay on the compute device. What decides speed is how often a needed expert is
already resident (hit rate) and how many bytes move; both are counted in :class:`OffloadStats`.

Tiers: a :class:`MemoryStore` (CPU tensors, pinned when CUDA is present) or a
:class:`SafetensorsStore` (a checkpoint's ``model.safetensors``, memory-mapped; each expert is a
slice read on demand) → a :class:`LayerExpertCache` on the compute device (GPU, or CPU itself).

Policies (``CACHE_POLICIES``): ``lru``; ``lfu`` (frequency seeded from a calibration trace of
routing counts, then updated online); ``pinned`` (the calibration's hottest experts are loaded
once and never evicted, every other expert is streamed for its use and dropped).

Prefetch: just before layer i's experts run, layer j's (the next MoE layer's) router is applied
to layer i's hidden state (through layer j's FFN norm) and the experts it would pick are loaded
into layer j's cache. On CUDA the copies run on a side stream and a use waits on their event
(a wait that was not already complete counts as a stall); on CPU copies are synchronous.

Computation is :class:`OffloadedExperts` with the ``Experts`` interface, installed on each
MoELayer with the ``loop`` dispatch, so offloaded outputs are bit-identical to in-memory ones.

Legend: E experts, D model dim, F expert hidden, m up-projection multiplier, n rows of one expert.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import ConfigError
from moelab.errors import UserError
from moelab.infer.cache_policy import CACHE_POLICIES, CachePolicy, LFUPolicy, LRUPolicy, PinnedPolicy
from moelab.infer.expert_store import (
    MemoryStore,
    Payload,
    SafetensorsStore,
    expert_payloads,
    export_experts,
    payload_bytes,
)
from moelab.moe.experts import Experts, PerExpertModule
from moelab.nn.activations import activate
from moelab.quant.experts import QuantExperts

# ----------------------------------------------------------------------------- statistics


@dataclass
class OffloadStats:
    """Counters for one run. ``lookups = hits + misses``; ``bytes_moved = misses · expert_bytes``
    (demand fetches) and ``prefetch_bytes = prefetch_loads · expert_bytes``, where
    ``expert_bytes`` is one expert's payload as stored: quantized experts move their int8/int4
    weights and scales, not full-precision ones."""

    lookups: int = 0
    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0
    prefetch_loads: int = 0
    prefetch_bytes: int = 0
    prefetch_hits: int = 0  # hits on an expert that a prefetch brought in (first use only)
    stalls: int = 0  # uses that had to wait: demand misses, and prefetches not yet complete
    stall_s: float = 0.0
    by_layer: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def count(self, layer: int, name: str, n: int = 1) -> None:
        setattr(self, name, getattr(self, name) + n)
        per = self.by_layer.setdefault(layer, {})
        per[name] = per.get(name, 0) + n

    def as_dict(self) -> dict[str, object]:
        keys = ("lookups", "hits", "misses", "bytes_moved", "prefetch_loads", "prefetch_bytes", "prefetch_hits", "stalls")
        out: dict[str, object] = {k: getattr(self, k) for k in keys}
        out["stall_s"] = round(self.stall_s, 6)
        out["hit_rate"] = self.hit_rate
        return out


# ----------------------------------------------------------------------------- the cache


class LayerExpertCache:
    """Up to ``capacity`` experts of one layer resident on ``device``."""

    def __init__(
        self,
        layer: int,
        num_experts: int,
        capacity: int,
        policy: CachePolicy,
        store,
        device: torch.device,
        stats: OffloadStats,
        expert_bytes: int,
        stream=None,
        prepare: Callable[[Payload], Payload] | None = None,
    ) -> None:
        self.layer, self.num_experts, self.capacity = layer, num_experts, capacity
        self.policy, self.store, self.device, self.stats = policy, store, torch.device(device), stats
        self.expert_bytes = expert_bytes
        self.stream = stream  # CUDA side stream for prefetch copies, or None
        self.prepare = prepare  # applied on the device after each copy (packing for the kernel, from disk)
        self.slots: dict[int, tuple[Payload, object]] = {}  # expert → (payload on the device, event)
        self.unused_prefetch: set[int] = set()
        for e in policy.initial()[:capacity]:
            self._insert(e, self._copy(e, None), protected=set())

    def _copy(self, expert: int, stream) -> tuple[Payload, object]:
        payload = self.store.load(self.layer, expert)
        if self.device.type == "cuda" and stream is not None:
            with torch.cuda.stream(stream):
                moved = tuple(t.to(self.device, non_blocking=True) for t in payload)
                if self.prepare is not None:
                    moved = self.prepare(moved)
                event = torch.cuda.Event()
                event.record(stream)
            return moved, event
        moved = tuple(t.to(self.device, copy=True) for t in payload)
        return (self.prepare(moved) if self.prepare is not None else moved), None

    def fetch(self, expert: int) -> Payload:
        """A miss's work without touching the cache or its counters: ``expert`` read from the store, copied to
        the device and prepared for its kernel. Why public: a benchmark times it to measure the bandwidth a
        tier really delivers (``moelab study hybrid-inference``)."""
        return self._copy(expert, None)[0]

    def _insert(self, expert: int, entry: tuple[Payload, object], protected: set[int]) -> bool:
        if len(self.slots) >= self.capacity:
            victim = self.policy.victim(self.slots.keys(), protected | {expert})
            if victim is None:
                return False
            del self.slots[victim]
            self.policy.forget(victim)
            self.unused_prefetch.discard(victim)
        self.slots[expert] = entry
        self.policy.inserted(expert)
        return True

    def get(self, expert: int) -> Payload:
        """The payload of ``expert`` (its weight tensors) on the compute device, fetched when not resident."""
        s, L = self.stats, self.layer
        s.count(L, "lookups")
        entry = self.slots.get(expert)
        if entry is not None:
            s.count(L, "hits")
            if expert in self.unused_prefetch:
                self.unused_prefetch.discard(expert)
                s.count(L, "prefetch_hits")
            event = entry[1]
            if event is not None:  # a prefetch copy on the side stream: wait for it once
                current = torch.cuda.current_stream(self.device)
                if not event.query():
                    t0 = time.perf_counter()
                    s.count(L, "stalls")
                    current.wait_event(event)
                    s.stall_s += time.perf_counter() - t0
                for t in entry[0]:
                    t.record_stream(current)  # allocated on the side stream, used on this one
                entry = (entry[0], None)
                self.slots[expert] = entry
        else:
            t0 = time.perf_counter()
            s.count(L, "misses")
            s.count(L, "stalls")
            s.count(L, "bytes_moved", self.expert_bytes)
            entry = self._copy(expert, None)
            s.stall_s += time.perf_counter() - t0
            if self.policy.admit(expert):
                self._insert(expert, entry, protected=set())
        self.policy.touch(expert)
        return entry[0]

    def prefetch(self, experts: list[int]) -> None:
        """Bring ``experts`` (most wanted first) in ahead of use, never evicting one of them."""
        wanted = set(experts[: self.capacity])
        for e in experts[: self.capacity]:
            if e in self.slots or not self.policy.admit(e):
                continue
            if len(self.slots) >= self.capacity and self.policy.victim(self.slots.keys(), wanted) is None:
                break
            if self._insert(e, self._copy(e, self.stream), protected=wanted):
                self.unused_prefetch.add(e)
                self.stats.count(self.layer, "prefetch_loads")
                self.stats.count(self.layer, "prefetch_bytes", self.expert_bytes)


# ----------------------------------------------------------------------------- the module


class ExpertRunner:
    """One expert's forward from its payload ``(w_up, w_down)``: full-precision experts."""

    def __init__(self, activation: str) -> None:
        self.activation = activation

    def prepare(self, payload: Payload) -> Payload:
        return payload

    def __call__(self, payload: Payload, x_nD: Tensor) -> Tensor:
        w_up, w_down = payload
        return F.linear(activate(F.linear(x_nD, w_up), self.activation), w_down)


class NativeExpertRunner(ExpertRunner):
    """Full-precision experts (bf16 or fp32) in moelab's native layouts: the payload
    ``(w_up, w_down)`` is packed once per fetch (:meth:`prepare`, a permutation of the same bytes)
    and multiplied by the native kernels, as resident :class:`moelab.infer.packed.NativeExperts` do."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__(experts.activation)
        self.dtype, self.d_model, self.up_rows = experts.w_up.dtype, experts.d_model, experts.w_up.shape[1]

    def prepare(self, payload: Payload) -> Payload:
        from moelab.infer.packed import _native_pack

        w_up, w_down = payload
        return _native_pack(w_up), _native_pack(w_down)

    def __call__(self, payload: Payload, x_nD: Tensor) -> Tensor:
        from moelab.infer.packed import _native_linear

        w_up, w_down = payload
        h = _native_linear(x_nD, w_up, None, self.up_rows, self.dtype)
        return _native_linear(activate(h, self.activation), w_down, None, self.d_model, self.dtype)


def native_runner_fits(experts: nn.Module, device: torch.device) -> bool:
    """Plain bf16/fp32 experts on a CPU where the native kernels build, with shapes they take."""
    from moelab.infer.packed import _native_fits, native_available

    return (
        device.type == "cpu" and isinstance(experts, Experts) and experts.w_up.dtype in (torch.bfloat16, torch.float32)
        and _native_fits(experts) and native_available()
    )  # fmt: skip


class QuantExpertRunner(ExpertRunner):
    """One quantized expert's forward from ``(up qweight, up scales, down qweight, down scales)``
    through :meth:`QuantLinear.apply_with`, with the same arithmetic as ``QuantExperts``."""

    def __init__(self, experts: nn.Module, device: torch.device) -> None:
        from moelab.quant.linear import QuantLinear

        super().__init__(experts.activation)
        self.device = device

        def shell(ql: QuantLinear) -> QuantLinear:  # shapes and settings only: the weights come from payloads
            out = QuantLinear(ql.in_features, ql.out_features, ql.bits, ql.group_size)
            for name in ("qweight", "scales", "scales_zeros"):
                if hasattr(out, name):
                    setattr(out, name, torch.empty(0))
            return out

        self.up, self.down = shell(experts.up[0]), shell(experts.down[0])

    def prepare(self, payload: Payload) -> Payload:
        """Weights in their stored form, read from a checkpoint → the device kernel's layout."""
        uq, us, dq, ds = payload
        up, down, device = self.up, self.down, self.device
        return (up.kernel_layout(uq, device), up.kernel_scales(us, device),
                down.kernel_layout(dq, device), down.kernel_scales(ds, device))  # fmt: skip

    def __call__(self, payload: Payload, x_nD: Tensor) -> Tensor:
        uq, us, dq, ds = payload
        return self.down.apply_with(activate(self.up.apply_with(x_nD, uq, us), self.activation), dq, ds)


class OffloadedExperts(PerExpertModule):
    """The ``Experts`` interface over a :class:`LayerExpertCache` (no parameters of its own)."""

    def __init__(
        self, cache: LayerExpertCache, d_model: int, hidden: int, activation: str, runner: ExpertRunner | None = None
    ) -> None:
        super().__init__()
        self.cache = cache
        self.num_experts, self.d_model, self.hidden, self.activation = cache.num_experts, d_model, hidden, activation
        self.runner = runner or ExpertRunner(activation)

    def forward_expert(self, e: int, x_nD: Tensor) -> Tensor:
        return self.runner(self.cache.get(e), x_nD)

    def extra_repr(self) -> str:
        return f"layer={self.cache.layer}, capacity={self.cache.capacity}/{self.num_experts}, device={self.cache.device}"


def parse_capacity(spec: str | float | int, num_experts: int) -> int:
    """Experts per layer kept resident: ``"25%"`` (of E, rounded up, at least 1) or a count."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            frac = float(text[:-1]) / 100.0
            if not 0 < frac <= 1:
                raise ValueError
            return max(1, min(num_experts, math.ceil(frac * num_experts - 1e-9)))
        n = int(text)
        if n < 1:
            raise ValueError
        return min(n, num_experts)
    except ValueError:
        raise ConfigError(
            f"expert cache size {spec!r} is invalid: expected a percentage in (0%, 100%] such as '25%', or a count >= 1"
        ) from None


@torch.no_grad()
def routing_counts(model: nn.Module, batches: Iterable[Tensor]) -> dict[int, list[float]]:
    """Calibration trace: how many tokens each expert of each MoE layer received."""
    counts: dict[int, Tensor] = {}
    for ids in batches:
        out = model(ids, return_routing=True)
        for layer, decision in (out.routing or {}).items():
            c = decision.tokens_per_expert().float().cpu()
            counts[layer] = counts.get(layer, torch.zeros_like(c)) + c
    return {layer: c.tolist() for layer, c in counts.items()}


def text_routing_counts(model: nn.Module, tokenizer, text: str, max_blocks: int = 16) -> dict[int, list[float]]:
    """:func:`routing_counts` of ``text`` (the first ``max_blocks`` blocks of ``max_seq_len`` tokens):
    the calibration trace that seeds the ``lfu`` and ``pinned`` cache policies."""
    n = model.cfg.max_seq_len
    ids = tokenizer.encode(text)[: max_blocks * n] or [tokenizer.bos_id]
    return routing_counts(model, [torch.tensor([ids[i : i + n]]) for i in range(0, len(ids), n)])


class Offloader:
    """Moves a model's routed experts into stores and installs cached :class:`OffloadedExperts`.

    Args:
        model: a moelab Transformer with MoE layers (its non-expert weights should already be
            on ``device``).
        capacity: per-layer cache size, ``"25%"`` or a count.
        policy: a ``CACHE_POLICIES`` name.
        prefetch: predict the next MoE layer's experts with its router and load them early.
        source: ``None`` (copy the experts out of the model into CPU memory) or the path of a
            safetensors file holding them (memory-mapped disk tier).
        counts: calibration routing counts by layer (``routing_counts``) for ``lfu``/``pinned``.
        native: run full-precision bf16/fp32 experts on moelab's native kernels (each fetched
            expert packed into their layout, as a packed decode copy's resident experts are) where
            they build; False (default) multiplies the fetched weights with ``F.linear``.
    """

    def __init__(
        self,
        model: nn.Module,
        capacity: str | float | int = "25%",
        policy: str = "lru",
        prefetch: bool = False,
        source: str | Path | None = None,
        device: torch.device | str | None = None,
        counts: dict[int, list[float]] | None = None,
        native: bool = False,
    ) -> None:
        moe_blocks = [(i, b) for i, b in enumerate(model.blocks) if b.is_moe]
        if not moe_blocks:
            raise UserError("--offload needs an MoE model: this model has no MoE layers")
        policy_cls = CACHE_POLICIES[policy]
        device = torch.device(device) if device is not None else next(model.parameters()).device
        use_cuda = device.type == "cuda"
        runners = {
            i: QuantExpertRunner(b.ffn.experts, device) if isinstance(b.ffn.experts, QuantExperts)
            else NativeExpertRunner(b.ffn.experts) if native and native_runner_fits(b.ffn.experts, device)
            else ExpertRunner(b.ffn.experts.activation)
            for i, b in moe_blocks
        }  # fmt: skip
        payloads = {i: expert_payloads(b.ffn.experts, device) for i, b in moe_blocks}
        if source is None:  # the memory tier holds native payloads packed once, not per fetch
            payloads = {
                i: [runners[i].prepare(p) for p in per] if isinstance(runners[i], NativeExpertRunner) else per
                for i, per in payloads.items()
            }
        store = MemoryStore(payloads, pin=use_cuda) if source is None else SafetensorsStore(source)
        self.stats = OffloadStats()
        self.stream = torch.cuda.Stream(device) if use_cuda and prefetch else None
        self.caches: dict[int, LayerExpertCache] = {}
        from moelab.moe.dispatch import DISPATCHERS

        for i, block in moe_blocks:
            layer, experts = block.ffn, block.ffn.experts
            E = experts.num_experts
            cap = parse_capacity(capacity, E)
            runner = runners[i]
            packs_on_fetch = store.needs_prepare or (source is not None and isinstance(runner, NativeExpertRunner))
            cache = LayerExpertCache(
                i, E, cap, policy_cls(cap, (counts or {}).get(i)), store, device, self.stats,
                payload_bytes(payloads[i][0]), self.stream, prepare=runner.prepare if packs_on_fetch else None,
            )  # fmt: skip
            self.caches[i] = cache
            layer.experts = OffloadedExperts(cache, experts.d_model, experts.hidden, experts.activation, runner)
            layer.dispatch = DISPATCHERS["loop"]
        self.handles = []
        if prefetch:
            ids = [i for i, _ in moe_blocks]
            for cur, nxt in itertools.pairwise(ids):
                hook = _prefetch_hook(model.blocks[nxt], self.caches[nxt])
                self.handles.append(model.blocks[cur].ffn_norm.register_forward_hook(hook))

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _prefetch_hook(next_block: nn.Module, cache: LayerExpertCache):
    """Forward hook on layer i's FFN norm: route layer i's hidden state with layer j's router."""

    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        with torch.no_grad():
            x_TD = args[0].reshape(-1, args[0].shape[-1])
            h_TD = next_block.ffn_norm(x_TD)
            logits_TE = next_block.ffn.router.logits(h_TD)
            k = next_block.ffn.cfg.top_k
            expert_TK = logits_TE.topk(k, dim=-1).indices
            votes = torch.bincount(expert_TK.reshape(-1), minlength=logits_TE.shape[-1]).tolist()  # one sync
            wanted = sorted((e for e, v in enumerate(votes) if v > 0), key=lambda e: -votes[e])
        cache.prefetch(wanted)

    return hook


__all__ = [
    "CACHE_POLICIES",
    "CachePolicy",
    "LFUPolicy",
    "LRUPolicy",
    "LayerExpertCache",
    "MemoryStore",
    "OffloadStats",
    "OffloadedExperts",
    "Offloader",
    "PinnedPolicy",
    "SafetensorsStore",
    "export_experts",
    "parse_capacity",
    "routing_counts",
    "text_routing_counts",
]

"""Routing traces: every MoE layer's decision for every token of a pass, streamed to disk.

Why a trace: the analyses (load, specialisation, drops by position, …) all ask "which expert
took which token, and what was that token?". Recording that once, compactly, lets each analysis
run on millions of tokens without re-running the model, and without holding a pass in memory.

Layout of a trace folder::

    meta.json                 layers, E, K, seq_len, label names, chunk list, vocab strings
    chunk_00000.safetensors   one chunk: token-level and per-layer arrays (below)
    ...

Token-level arrays of a chunk (N tokens, in batch order):
    ``token`` int32 token id, ``position`` int32 place in its sequence (= in its capacity group
    row), ``row`` int32 the token's sequence index in its batch, ``doc`` int32 document id,
    ``label.NAME`` int16/int32 label ids (domain, lang, …), ``valid`` uint8 (not padding).
Per MoE layer ``L`` (A assignments; A = N·K for token-choice routers, any count otherwise):
    ``L.top1`` int16 [N] the token's best expert by router score, ``L.margin`` float16 [N]
    top-1 minus top-2 score, ``L.a_token`` int32 [A] index into the chunk's tokens,
    ``L.a_expert`` int16, ``L.a_rank`` int16, ``L.a_weight`` float16, ``L.a_kept`` uint8.

Memory: a :class:`TraceWriter` keeps at most one chunk (``chunk_tokens`` tokens) of small
integer arrays before writing it, so recording RAM is bounded whatever the pass length
(``benchmarks/trace_memory.py`` prints the peak for 1M tokens × 4 layers).

Legend: N tokens in a chunk or trace, A assignments, E experts, K top-k.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import Tensor

from moelab.data.loader import Batch, PackedData, eval_batches
from moelab.errors import UserError
from moelab.moe.decision import RoutingDecision
from moelab.outputs import OutputKind, check_output, discard

FORMAT = "moelab-trace-v1"
META = "meta.json"
CHUNK_PREFIX, CHUNK_SUFFIX = "chunk_", ".safetensors"


def _foreign_in_trace(entry: Path) -> Path | None:
    """``entry``, unless it is a file a trace holds (``meta.json``, ``chunk_NNNNN.safetensors``)."""
    name = entry.name
    chunk = name.startswith(CHUNK_PREFIX) and name.endswith(CHUNK_SUFFIX)
    if chunk and not name[len(CHUNK_PREFIX) : -len(CHUNK_SUFFIX)].isdigit():
        chunk = False
    return None if (name == META or chunk) and entry.is_file() and not entry.is_symlink() else entry


TRACE_FOLDER = OutputKind("routing trace", _foreign_in_trace)  # what a trace folder holds (moelab.outputs)


def _label_dtype(n_values: int) -> type:
    return np.int16 if n_values < 2**15 else np.int32


def _np(t: Tensor, dtype: Any) -> np.ndarray:
    return t.detach().to("cpu").numpy().astype(dtype, copy=False)


def decision_arrays(decision: RoutingDecision) -> dict[str, np.ndarray]:
    """The compact per-layer arrays of one decision (see module doc), keyed without layer prefix."""
    scores_TE = decision.scores.detach().float()
    if scores_TE.shape[1] >= 2:
        top2_T2 = scores_TE.topk(2, dim=-1)
        top1_T = top2_T2.indices[:, 0]
        margin_T = top2_T2.values[:, 0] - top2_T2.values[:, 1]
    else:
        top1_T = torch.zeros(scores_TE.shape[0], dtype=torch.long)
        margin_T = torch.ones(scores_TE.shape[0])
    return {
        "top1": _np(top1_T, np.int16),
        "margin": _np(margin_T, np.float16),
        "a_token": _np(decision.token, np.int32),
        "a_expert": _np(decision.expert, np.int16),
        "a_rank": _np(decision.rank, np.int16),
        "a_weight": _np(decision.weight.float(), np.float16),
        "a_kept": _np(decision.kept, np.uint8),
    }


class TraceWriter:
    """Context manager that streams routing decisions and token metadata to a trace folder.

    Use::

        with TraceWriter(path, label_names=data.label_names) as tw:
            for batch in batches:
                out = model(batch.input_ids, return_routing=True)
                tw.record(out.routing, batch)

    ``record`` accepts any ``{layer: RoutingDecision}`` whose decisions cover the batch's
    ``B·S`` tokens in row-major order (what ``Transformer(…, return_routing=True)`` returns).
    An earlier trace at ``path`` is replaced; a folder holding anything else is refused untouched
    (:data:`TRACE_FOLDER`): recording used to ``rmtree`` whatever was there.
    """

    def __init__(
        self,
        path: str | Path,
        label_names: dict[str, list[str]] | None = None,
        chunk_tokens: int = 65_536,
        extra_meta: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.label_names = {k: list(v) for k, v in (label_names or {}).items()}
        self.chunk_tokens = chunk_tokens
        self.extra_meta = dict(extra_meta or {})
        self._buf: list[dict[str, np.ndarray]] = []
        self._buf_tokens = 0
        self._chunks: list[dict[str, int]] = []
        self._layers: list[int] | None = None
        self._num_experts: int | None = None
        self._top_k: int | None = None
        self._seq_len: int | None = None
        self.num_tokens = 0

    def __enter__(self) -> TraceWriter:
        # an earlier trace at this path is replaced; a folder holding anything else is refused, untouched
        check_output(self.path, TRACE_FOLDER, overwrite=True)
        discard(self.path)
        self.path.mkdir(parents=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, routing: dict[int, RoutingDecision], batch: Batch | Tensor) -> None:
        """Append one batch: its token metadata and every layer's decision."""
        ids_BS = batch.input_ids if isinstance(batch, Batch) else batch
        B, S = ids_BS.shape
        if not routing:
            raise UserError("the model returned no routing decisions: is it an MoE model?")
        layers = sorted(routing)
        if self._layers is None:
            self._layers = layers
            first = routing[layers[0]]
            self._num_experts = first.num_experts
            self._top_k = max(1, first.num_assignments // max(1, first.num_tokens))
            self._seq_len = S
        elif layers != self._layers:
            raise UserError(f"routing layers changed within a trace: {self._layers} then {layers}")
        arrays: dict[str, np.ndarray] = {
            "token": _np(ids_BS.reshape(-1), np.int32),
            "position": np.tile(np.arange(S, dtype=np.int32), B),
            "row": np.repeat(np.arange(B, dtype=np.int32), S),
        }
        valid = np.ones(B * S, dtype=np.uint8)
        if isinstance(batch, Batch):
            arrays["doc"] = _np(batch.doc_ids.reshape(-1), np.int32)
            for name, ids in batch.label_ids.items():
                n = len(self.label_names.get(name, ())) or int(ids.max()) + 1
                arrays[f"label.{name}"] = _np(ids.reshape(-1), _label_dtype(n))
        for layer in layers:
            d = routing[layer]
            if d.num_tokens != B * S:
                raise UserError(f"layer {layer} routed {d.num_tokens} tokens, the batch has {B * S}")
            if d.token_mask is not None:
                valid &= _np(d.token_mask.reshape(-1), np.uint8)
            for key, arr in decision_arrays(d).items():
                arrays[f"{layer}.{key}"] = arr
        arrays["valid"] = valid
        self._buf.append(arrays)
        self._buf_tokens += B * S
        self.num_tokens += B * S
        if self._buf_tokens >= self.chunk_tokens:
            self.flush()

    def flush(self) -> None:
        """Write the buffered batches as one chunk file and free them."""
        if not self._buf:
            return
        merged: dict[str, np.ndarray] = {}
        offset = 0
        offsets = []
        for arrays in self._buf:
            offsets.append(offset)
            offset += len(arrays["token"])
        for key in self._buf[0]:
            parts = [a[key] for a in self._buf]
            if key.endswith(".a_token"):  # batch-local token index → chunk-local
                parts = [p + o for p, o in zip(parts, offsets)]
            merged[key] = np.concatenate(parts)
        name = f"chunk_{len(self._chunks):05d}.safetensors"
        save_file(merged, str(self.path / name))
        self._chunks.append({"file": name, "tokens": offset})
        self._buf, self._buf_tokens = [], 0

    def close(self) -> None:
        self.flush()
        meta = {
            "format": FORMAT,
            "layers": self._layers or [],
            "num_experts": self._num_experts,
            "top_k": self._top_k,
            "seq_len": self._seq_len,
            "num_tokens": self.num_tokens,
            "label_names": self.label_names,
            "chunks": self._chunks,
            **self.extra_meta,
        }
        (self.path / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")


@dataclass
class Trace:
    """A recorded trace, read back lazily: ``trace.tokens("label.domain")``, ``trace.layer(2)["top1"]``.

    Arrays are concatenated over chunks on first use and cached; ``a_token`` indices are made
    global (index into the trace's N tokens).
    """

    path: Path
    meta: dict[str, Any]
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        p = Path(path)
        try:
            meta = json.loads((p / META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{p} is not a routing trace (cannot read {META}: {exc})") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{p / META} has format {meta.get('format')!r}, expected {FORMAT!r}")
        return cls(p, meta)

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def label_names(self) -> dict[str, list[str]]:
        return dict(self.meta.get("label_names", {}))

    def names(self) -> list[str]:
        if not self.meta["chunks"]:
            return []
        with safe_open(str(self.path / self.meta["chunks"][0]["file"]), framework="numpy") as f:
            return list(f.keys())

    def array(self, key: str) -> np.ndarray:
        """One array over the whole trace (chunks concatenated)."""
        if key not in self._cache:
            parts, offset = [], 0
            for chunk in self.meta["chunks"]:
                with safe_open(str(self.path / chunk["file"]), framework="numpy") as f:
                    if key not in f.keys():  # noqa: SIM118 - safetensors handle, not a dict
                        raise KeyError(f"trace {self.path} has no array {key!r}")
                    a = f.get_tensor(key)
                if key.endswith(".a_token"):
                    a = a.astype(np.int64) + offset
                parts.append(a)
                offset += chunk["tokens"]
            self._cache[key] = np.concatenate(parts) if parts else np.zeros(0)
        return self._cache[key]

    def tokens(self, key: str) -> np.ndarray:
        return self.array(key)

    def layer(self, layer: int) -> dict[str, np.ndarray]:
        names = ("top1", "margin", "a_token", "a_expert", "a_rank", "a_weight", "a_kept")
        return {n: self.array(f"{layer}.{n}") for n in names}

    def labels(self) -> list[str]:
        return [k[len("label.") :] for k in self.names() if k.startswith("label.")]


def iter_batches(data: PackedData | Iterable[Batch], batch_size: int, max_tokens: int | None) -> Iterator[Batch]:
    """Batches of ``data`` up to about ``max_tokens`` tokens (evenly spaced blocks of a PackedData)."""
    if isinstance(data, PackedData):
        max_batches = None
        if max_tokens is not None:
            max_batches = max(1, max_tokens // (batch_size * data.seq_len))
        yield from eval_batches(data, batch_size, max_batches)
        return
    seen = 0
    for b in data:
        if max_tokens is not None and seen >= max_tokens:
            return
        seen += b.input_ids.numel()
        yield b


@torch.no_grad()
def collect(
    model: torch.nn.Module,
    data: PackedData | Iterable[Batch],
    path: str | Path | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    label_names: dict[str, list[str]] | None = None,
    progress: bool = False,
    chunk_tokens: int = 65_536,
) -> Trace:
    """Run ``model`` over ``data`` in eval mode and record its routing; returns the loaded :class:`Trace`.

    ``data`` is a :class:`PackedData` (blocks evenly spaced over it, so every domain appears) or
    any iterable of :class:`Batch`. ``path`` defaults to a fresh temporary folder.
    """
    from moelab.analysis.progress import progress_iter

    if label_names is None and isinstance(data, PackedData):
        label_names = data.label_names
    out_path = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="moelab-trace-"))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = None
    if isinstance(data, PackedData):
        n_blocks = data.num_blocks if max_tokens is None else min(data.num_blocks, max(1, max_tokens // (batch_size * data.seq_len)) * batch_size)
        total = -(-n_blocks // batch_size)
    try:
        with TraceWriter(out_path, label_names, chunk_tokens) as tw:
            batches = iter_batches(data, batch_size, max_tokens)
            for batch in progress_iter(batches, "tracing routing", total=total, enabled=progress):
                out = model(batch.input_ids.to(device), return_routing=True)
                tw.record(out.routing or {}, batch)
    finally:
        model.train(was_training)
    return Trace.load(out_path)

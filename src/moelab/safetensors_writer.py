"""Write safetensors files tensor by tensor, from a plan, straight from each tensor's memory.

Why: a safetensors header lists every tensor's offsets, so a writer needs every name, dtype and
shape before the first byte of data. ``safetensors.torch.save_file`` takes them as a dict of
finished tensors (and before safetensors 0.8 copies each one into ``bytes`` first): an export that
converts its tensors would hold the whole converted model beside the original. Here a *plan*
(:class:`Planned` names, dtypes and shapes; e.g. the same conversion run on ``meta`` tensors, which
costs nothing) fixes the files and their headers up front; each tensor is then written when it is
produced and dropped, so an export holds at most the tensors of one conversion step beside the model.

Shards (:func:`write_shards`): the plan is cut in order, like transformers' ``save_pretrained``: a
shard is closed before the tensor that would take it past ``max_shard_bytes`` (a larger tensor gets
a shard of its own). One shard is written as ``model.safetensors``; more as
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (``metadata.total_size``
and ``weight_map``), the layout ``from_pretrained`` and :mod:`moelab.safetensors_reader` read.

This module knows nothing about models; it sits at the bottom of the layers with :mod:`moelab.outputs`.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor, nn

from moelab.errors import UserError
from moelab.safetensors_reader import DTYPE_NAMES, INDEX_FILE, tensor_nbytes

SINGLE_FILE = "model.safetensors"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # what write_shards names its shards
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


@dataclass(frozen=True)
class Planned:
    """One tensor a writer will receive: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @classmethod
    def of(cls, name: str, t: Tensor) -> Planned:
        return cls(name, t.dtype, tuple(t.shape))


def parse_size(size: int | str) -> int:
    """Bytes of a size given as an int or a string: ``"5GB"`` (10⁹), ``"500MiB"`` (2²⁰), ``"200MB"``…"""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if m is None or m.group(2) not in _UNITS:
            raise UserError(f"max shard size {size!r} is invalid: give bytes or a size such as 500MB, 5GB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value < 1:
        raise UserError(f"max shard size {size!r} is invalid: it must be at least 1 byte")
    return value


def shard_plan(plan: list[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    """``plan`` cut in order into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for p in plan:
        if shards[-1] and size + p.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def write_shards(
    folder: str | Path,
    plan: list[Planned],
    tensors: Iterable[tuple[str, Tensor]],
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` (produced in ``plan`` order) into ``folder`` as one file or shards plus the index;
    return the file names written. A tensor that is not the next planned one is a programming error."""
    out = Path(folder)
    shards = shard_plan(plan, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    stream = iter(tensors)
    for name, shard in zip(names, shards):
        _write_file(out / name, shard, stream, metadata)
    extra = next(stream, None)
    if extra is not None:
        raise AssertionError(f"tensor {extra[0]!r} was produced but not planned")
    if n == 1:
        return names
    index = {
        "metadata": {"total_size": sum(p.nbytes for p in plan)},
        "weight_map": {p.name: name for name, shard in zip(names, shards) for p in shard},
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX_FILE]


def unique_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with each tied tensor under its first name only (as safetensors stores it)."""
    first: dict[int, str] = {}
    aliases = set()
    for name, t in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        if id(t) in first:
            aliases.add(name)
        else:
            first[id(t)] = name
    return {k: v for k, v in model.state_dict().items() if k not in aliases}


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write finished tensors (``(name, tensor)`` pairs, e.g. a state dict's items) to one file, no copy."""
    items = list(tensors)
    _write_file(Path(path), [Planned.of(n, t) for n, t in items], iter(items), metadata)


def _write_file(path: Path, plan: list[Planned], stream: Iterator[tuple[str, Tensor]], metadata: dict[str, str] | None) -> None:
    header: dict[str, object] = {}
    offset = 0
    for p in plan:
        if p.dtype not in DTYPE_NAMES:
            raise UserError(f"tensor {p.name!r} has dtype {p.dtype}, which safetensors files here do not hold")
        header[p.name] = {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for p in plan:
            name, t = next(stream, (None, None))
            if name != p.name or t is None or t.dtype != p.dtype or tuple(t.shape) != p.shape:
                got = None if t is None else (name, t.dtype, tuple(t.shape))
                raise AssertionError(f"expected tensor {(p.name, p.dtype, p.shape)}, got {got}")
            _write_tensor(f, t)


def _write_tensor(f, t: Tensor) -> None:
    """The bytes of ``t`` (little-endian, row-major) written from its own memory (one tensor moved off a GPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel():
        f.write(t.reshape(-1).view(torch.uint8).numpy().data)


if sys.byteorder != "little":  # safetensors is little-endian; tensors are written as they lie in memory
    raise ImportError("moelab.safetensors_writer needs a little-endian machine")

__all__ = ["SHARD_NAME", "SINGLE_FILE", "Planned", "parse_size", "shard_plan", "unique_state", "write_safetensors",
           "write_shards"]  # fmt: skip

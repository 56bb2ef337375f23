"""Read safetensors weights one tensor at a time: every header first, each tensor's data on demand.

Why: loading a released model must not hold it twice. ``safetensors.torch.load_file`` reads every
tensor of a file at once, beside the model it is copied into. Here the headers of all files (one
file, the shards listed in ``model.safetensors.index.json``, or a folder's ``*.safetensors``) give
each tensor's file, dtype and shape before any data is read, so a loader can check names and
shapes, size the model and pick its dtype first, and then read each tensor only when it copies it
into place.

Data is read through ``safetensors.safe_open`` (memory-mapped: a tensor is not copied until it is
converted or copied into the model). The pages of a mapped file that were read count as the
process's memory for as long as the mapping is open, so :class:`SafetensorsReader` closes it once
``map_budget`` bytes were read through it, and whenever the next tensor lives in another file: the
mapped pages held stay bounded by the budget, not by the size of a shard.

This module knows nothing about models; it sits at the bottom of the layers with :mod:`moelab.outputs`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moelab.errors import UserError

# safetensors dtype names ↔ torch dtypes (the ones a language model's weights use)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
MAP_BUDGET = 64 * 2**20  # bytes read through one mapping before it is closed (its pages count as ours till then)


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor's data: ``dtype.itemsize × numel``."""
    return dtype.itemsize * math.prod(shape)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, its name there, dtype, shape and the offset of its data."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor's :class:`TensorInfo` in the safetensors file ``path``, from its header alone.

    A file that is not safetensors (a pickle renamed ``.safetensors``, a truncated header) is a
    UserError naming it; nothing in it is executed or loaded.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            size = p.stat().st_size
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise UserError(f"{p} is not a safetensors file (pickles and other formats are refused)")
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"cannot read {p}: {exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{p} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise UserError(f"{p} is not a safetensors file: its header is not a JSON object")
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, _end) = DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{p}: the header entry of {key!r} is damaged") from None
        if dtype is None:
            raise UserError(f"{p}: tensor {key!r} has dtype {entry['dtype']!r}, which moelab does not load")
        infos[key] = TensorInfo(p, key, dtype, tuple(int(s) for s in shape), 8 + n + int(begin))
    return infos


def folder_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder: the shards its index lists, else every ``*.safetensors``
    (sorted); an empty list when there are none. A shard the index names but the folder lacks is a UserError."""
    p = Path(folder)
    index = p / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"cannot read {index}: {exc}") from None
        absent = [n for n in names if not (p / n).is_file()]
        if absent:
            raise UserError(f"{index} lists {', '.join(absent[:4])}, which {p} does not hold (an incomplete download?)")
        return [p / n for n in names]
    return sorted(f for f in p.glob("*.safetensors") if f.is_file())


class SafetensorsReader(Mapping[str, Tensor]):
    """The tensors of one or more safetensors files as a read-on-demand mapping ``name → Tensor``.

    ``reader[name]`` reads that tensor (its dtype as stored; a view of the mapped file until it is
    copied). Names are known at once (``infos``), so ``in``, ``len`` and iteration read no data.
    Use it as a context manager, or call :meth:`close`, to drop the last mapping.
    """

    def __init__(self, files: Sequence[str | Path], map_budget: int = MAP_BUDGET) -> None:
        self.infos: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(f).items():
                if name in self.infos:
                    raise UserError(f"tensor {name!r} is stored twice: in {self.infos[name].file} and in {f}")
                self.infos[name] = info
        self.map_budget = map_budget
        self._handle: Any = None
        self._file: Path | None = None
        self._read = 0

    @classmethod
    def folder(cls, folder: str | Path, map_budget: int = MAP_BUDGET) -> SafetensorsReader:
        """The weights of a model folder (see :func:`folder_weight_files`)."""
        files = folder_weight_files(folder)
        if not files:
            raise UserError(f"{folder} holds no .safetensors weights")
        return cls(files, map_budget)

    def renamed(self, rename: dict[str, str]) -> SafetensorsReader:
        """The same files with tensors renamed (``rename``: old → new; others keep their name)."""
        out = SafetensorsReader([], self.map_budget)
        out.infos = {rename.get(k, k): v for k, v in self.infos.items()}
        return out

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, name: str) -> Tensor:
        info = self.infos[name]
        handle = self._open(info.file)
        try:
            tensor = handle.get_tensor(info.key)
        except Exception as exc:  # safetensors raises its own error types for damaged data
            raise UserError(f"cannot read tensor {info.key!r} from {info.file}: {exc}") from None
        self._read += info.nbytes
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    # ------------------------------------------------------------------ what is stored
    def in_file_order(self) -> list[str]:
        """Names sorted by file, then by position in it: reading in this order reads each file once, forwards."""
        return sorted(self.infos, key=lambda n: (str(self.infos[n].file), self.infos[n].offset))

    def float_dtype(self) -> torch.dtype | None:
        """The floating dtype holding most of the floating-point bytes (the weights' dtype; a few fp32
        norms or router weights beside bf16 matrices do not change it), or None when there is none."""
        total: dict[torch.dtype, int] = {}
        for info in self.infos.values():
            if info.dtype.is_floating_point:
                total[info.dtype] = total.get(info.dtype, 0) + info.nbytes
        return max(total, key=lambda d: total[d]) if total else None

    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    # ------------------------------------------------------------------ mapping lifetime
    def _open(self, file: Path):
        if self._handle is not None and (file != self._file or self._read >= self.map_budget):
            self.close()
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:
                raise UserError(f"cannot read {file}: {exc}") from None
            self._file, self._read = file, 0
        return self._handle

    def close(self) -> None:
        """Drop the open mapping (tensors already returned stay valid: they hold their own reference)."""
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._file, self._read = None, None, 0

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DTYPES", "DTYPE_NAMES", "INDEX_FILE", "SafetensorsReader", "TensorInfo", "folder_weight_files", "read_header"]

"""The files of a Hugging Face folder: ``config.json`` and safetensors weights, read and written streaming.

Reading: :func:`open_hf_weights` gives a :class:`~moelab.safetensors_reader.SafetensorsReader` over
the folder's single file or its shards (``model.safetensors.index.json``); nothing is read until a
tensor is asked for. Pickled weights are refused with the one-line way out.

Writing: :func:`write_hf_weights` runs a conversion twice, first on ``meta`` copies of the model's
tensors (free: it gives every output name, dtype and shape, hence the shard layout and the headers),
then on the real tensors, writing each output as it is produced
(:func:`~moelab.safetensors_writer.write_shards`). A shard holds at most ``max_shard_size`` bytes;
transformers' default, 5 GB, is the default here too.

Load dtype (:func:`load_dtype`): the one asked for, else the stored weights' (the floating dtype
holding most bytes), else fp32. A stored dtype moelab does not compute in (fp64, fp8) loads as fp32.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moelab.errors import UserError
from moelab.model.materialize import load_dtype as choose_dtype
from moelab.safetensors_reader import SafetensorsReader, folder_weight_files
from moelab.safetensors_writer import Planned, parse_size, write_shards

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default

# produce(state) → (HF name, tensor) pairs, in the same order for meta and for real tensors
Produce = Callable[[Mapping[str, Tensor]], Iterator[tuple[str, Tensor]]]


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a local HF folder as a dict (UserError when missing or not JSON)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{p} is not a Hugging Face model folder: config.json is missing")
    try:
        data = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read {p / 'config.json'}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p / 'config.json'} does not hold a JSON object")
    return data


def open_hf_weights(path: str | Path) -> SafetensorsReader:
    """A reader over the safetensors weights of a local HF folder; safetensors only (never unpickles)."""
    p = Path(path)
    files = folder_weight_files(p)
    if not files:
        pickled = [n for n in PICKLE_FILES if (p / n).exists()]
        hint = f" (found {', '.join(pickled)}: re-save it with safe_serialization=True)" if pickled else ""
        raise UserError(f"{p} has no .safetensors weights{hint}; moelab never loads pickled weights")
    return SafetensorsReader(files)


def load_dtype(dtype: str | torch.dtype | None, reader: SafetensorsReader) -> torch.dtype:
    """The dtype to load in: ``dtype`` if given, else the stored weights' (see the module doc)."""
    return choose_dtype(dtype, reader.float_dtype())


def write_hf_weights(
    folder: Path, produce: Produce, state: Mapping[str, Tensor], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> torch.dtype:
    """Write ``produce(state)`` into ``folder`` as ``model.safetensors`` or shards plus the index; return
    the dtype holding most of the written bytes (for ``config.json``'s ``dtype``)."""
    limit = parse_size(max_shard_size)
    plan = [Planned.of(n, t) for n, t in produce({k: v.to("meta") for k, v in state.items()})]
    write_shards(folder, plan, produce(state), limit, metadata={"format": "pt"})
    total: dict[torch.dtype, int] = {}
    for p in plan:
        total[p.dtype] = total.get(p.dtype, 0) + p.nbytes
    return max(total, key=lambda d: total[d]) if total else torch.float32


def write_hf_config(folder: Path, hf: dict[str, Any], dtype: torch.dtype) -> None:
    """``config.json`` with ``dtype`` set to the weights' (transformers reads it to pick the load dtype)."""
    out = {**hf, "dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "PICKLE_FILES",
    "load_dtype",
    "open_hf_weights",
    "read_hf_config",
    "write_hf_config",
    "write_hf_weights",
]

"""Checkpoint folders: their names, their completion marker, finding and verifying them; never unpickled.

A checkpoint is a folder (``RUN/checkpoints/step_00000100/``):
- ``model.safetensors``: the weights (tied weights stored once);
- ``config.yaml``: the run config (``model``, ``data``, ``train``);
- ``tokenizer.json``: the tokenizer (HF format for BPE, a moelab JSON for bytes);
- ``state.safetensors``: optimizer moments and RNG states (tensors);
- ``state.json``: step, sampler position, optimizer hyper-parameters, counters (the rest);
- ``COMPLETE``: the completion marker, written last: size and SHA-256 of every file above.

Why this shape: pickle runs code on load, so nothing here is a pickle, and a file that looks
like one is refused. The folder is written under a temporary name, every file fsync'd, then
renamed into place (:func:`moelab.outputs.staged_folder`), so a crash leaves either a whole
checkpoint or an ignorable ``.tmp-`` folder; the marker's sizes and hashes catch a file truncated
or damaged later. Pruning renames a checkpoint out of the way before deleting it, so a kill never
leaves a half-deleted folder under a ``step_`` name. Weights that are not finite (a run that
diverged) are refused on load, naming the tensor.

This package is the house's checkpoint I/O: it sits below every model-building layer (it knows files,
configs and tokenizers, not models); building a model from any folder is :mod:`moelab.convert.load`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from moelab.config import ConfigError, ModelConfig, RunConfig, from_dict
from moelab.errors import UserError
from moelab.outputs import TMP_PREFIX, discard, files_kind

MARKER = "COMPLETE"
FILES = ("model.safetensors", "config.yaml", "tokenizer.json", "state.safetensors", "state.json")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
CKPT_PREFIX = "step_"
CHECKPOINT = files_kind("checkpoint", (*FILES, MARKER))  # what a checkpoint folder holds (moelab.outputs)


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- optimizer/RNG state without pickle


def refuse_pickles(folder: Path) -> None:
    """Raise when ``folder`` holds pickle-bearing files: moelab never unpickles."""
    bad = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if bad:
        raise UserError(
            f"{folder} holds pickle files ({', '.join(bad)}); moelab never loads pickles because they can run "
            "code: convert the weights to safetensors first"
        )


def check_safetensors_file(path: Path) -> None:
    """Refuse a file that is not safetensors (e.g. a pickle renamed ``.safetensors``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        raise UserError(f"{path} is not a safetensors file (pickles and other formats are refused)")


def verify_checkpoint(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None when it is complete and intact."""
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker (half-written?)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "damaged completion marker"
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {info['size']} (truncated?)"
        if file_sha256(f) != info["sha256"]:
            return f"{name} does not match its checksum (damaged)"
    return None


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(CKPT_PREFIX) :])
    except ValueError:
        return -1


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run (complete or not), oldest first; temporaries excluded."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX) and _step_of(p) >= 0]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete, intact checkpoint of a run; damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {reason}", UserWarning, stacklevel=2)
    return None


def prune_checkpoints(run_dir: str | Path, keep_last: int, newest: Path | None = None) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints up to ``newest``, and stale temporaries.

    ``newest`` is the checkpoint just written: it is always kept, and checkpoints of later steps are
    never touched (keep-last must not delete what was just saved because the folder holds later
    steps). Each deleted folder is renamed to a temporary first (:func:`moelab.outputs.discard`).
    """
    complete = [p for p in list_checkpoints(run_dir) if (p / MARKER).is_file()]
    if newest is not None:
        complete = [p for p in complete if _step_of(p) <= _step_of(Path(newest))]
    for p in complete[:-keep_last] if keep_last > 0 else []:
        if newest is None or p.name != Path(newest).name:
            discard(p)
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(f"{TMP_PREFIX}*"):
            if not p.name.endswith(f"-{os.getpid()}"):
                discard(p)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest complete one of a run folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} does not exist")
    if (p / MARKER).exists() or (p / "model.safetensors").exists():
        reason = verify_checkpoint(p)
        if reason is not None:
            raise UserError(f"checkpoint {p} is not usable: {reason}")
        return p
    found = latest_checkpoint(p)
    if found is None:
        refuse_pickles(p)
        raise UserError(f"{p} holds no complete checkpoint (expected model.safetensors + {MARKER}, or checkpoints/)")
    return found


# ----------------------------------------------------------------------------- load


def read_run_config(ckpt: Path) -> RunConfig:
    """The run config in a checkpoint; a model-only config becomes the ``model`` of a default run."""
    try:
        data = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {ckpt / 'config.yaml'}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{ckpt / 'config.yaml'} does not hold a mapping")
    try:
        if "model" in data:
            return from_dict(RunConfig, data)
        return RunConfig(model=from_dict(ModelConfig, data))
    except ConfigError as exc:
        raise UserError(f"{ckpt / 'config.yaml'}: {exc}") from None


def refuse_non_finite(state: Mapping[str, torch.Tensor], where: Path) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor.

    Why: a run that diverged can save weights that are all NaN; they would evaluate to a NaN loss
    and generate garbage with exit code 0. Integer tensors (quantized weights) are skipped.
    """
    for name, t in state.items():
        _refuse_non_finite_tensor(name, t, where)


NONFINITE_CHUNK = 1 << 20  # elements checked at once: isfinite's temporaries stay a few MB beside a large tensor


def _refuse_non_finite_tensor(name: str, t: torch.Tensor, where: str | Path) -> None:
    """:func:`refuse_non_finite` for one tensor, checked in chunks (no mask the size of the tensor)."""
    if not t.is_floating_point():
        return
    flat = t.detach().reshape(-1)
    bad = sum(int((~torch.isfinite(c)).sum()) for c in flat.split(NONFINITE_CHUNK))
    if bad:
        hint = " (fp16 overflows past ±65504: load it in bf16 or fp32)" if t.dtype == torch.float16 else ""
        raise UserError(
            f"{where}: tensor {name!r} holds {bad} of {t.numel()} values that are NaN or infinite{hint}; the run "
            "diverged before this was saved: use an earlier checkpoint"
        )


def is_model_folder(p: Path) -> bool:
    """A folder of weights without training state, written by ``convert``/``upcycle``/``moefy``/
    ``merge``/``prune`` (``config.yaml`` + ``model.safetensors``) or a Hugging Face folder.

    Training checkpoints carry ``state.json`` and a completion marker; these folders carry neither
    (an unmarked training checkpoint is still refused as half-written)."""
    if not p.is_dir() or (p / MARKER).exists() or (p / "state.json").exists():
        return False
    return (p / "config.json").is_file() or ((p / "config.yaml").is_file() and (p / "model.safetensors").is_file())


def resolve_model_folder(path: str | Path) -> Path:
    """The folder whose weights ``path`` names: a model folder as it is, else the checkpoint
    :func:`resolve_checkpoint` finds (a run folder's newest complete one)."""
    p = Path(path)
    if is_model_folder(p):
        return p
    if not p.exists():
        raise UserError(f"{p} does not exist: give a model folder (moelab or Hugging Face), a checkpoint or a run folder")
    return resolve_checkpoint(p)

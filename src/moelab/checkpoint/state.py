"""Writing a training checkpoint and restoring one into a training run: weights, optimizer, RNG.

See :mod:`moelab.checkpoint.folder` for the folder's shape and its rules. Weights are written from the
tensors' own memory (:mod:`moelab.safetensors_writer`); what a higher layer must say of a model in
``state.json`` (the quantization record of a quantized model) comes from a describer it registered
(:func:`register_extra_state`), so this layer knows no model kind.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as _st_load_model
from torch import nn

from moelab.checkpoint.folder import (
    CHECKPOINT,
    FILES,
    MARKER,
    check_safetensors_file,
    file_sha256,
    refuse_non_finite,
    refuse_pickles,
)
from moelab.config import ModelConfig, RunConfig, to_dict
from moelab.data.tokenizer import Tokenizer
from moelab.errors import UserError
from moelab.outputs import fsync_file, staged_folder
from moelab.safetensors_writer import unique_state, write_safetensors


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


# ----------------------------------------------------------------------------- save


# What a layer above says of a model in state.json (moelab.quant: how to rebuild its quantized modules), so
# this layer writes it without knowing model kinds. Each describer returns {} for a model it does not know.
_EXTRA_STATE: list[Callable[[nn.Module], Mapping[str, Any]]] = []


def register_extra_state(describe: Callable[[nn.Module], Mapping[str, Any]]) -> Callable[[nn.Module], Mapping[str, Any]]:
    """Register ``describe(model) → {key: JSON-able}``, merged into every checkpoint's ``state.json``."""
    _EXTRA_STATE.append(describe)
    return describe


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    config: RunConfig | ModelConfig,
    tokenizer: Tokenizer,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a complete checkpoint folder at ``path`` atomically and return it.

    ``train_state`` is JSON-able data (step, sampler state, counters); the optimizer's tensors
    and the RNG states go to ``state.safetensors``; what the describers registered with
    :func:`register_extra_state` say of ``model`` goes into ``state.json`` beside them. An existing *checkpoint* at ``path`` is
    replaced when ``overwrite`` (a run re-saving its step); any other non-empty folder there (a
    run folder, files moelab did not write) is refused with a UserError and left untouched.
    """
    with staged_folder(path, CHECKPOINT, overwrite=overwrite) as tmp:
        # streamed from the tensors' own memory (safetensors' save_file first copies every tensor to bytes:
        # twice the model at the peak, which a 7B bf16 LoRA run cannot afford)
        write_safetensors(tmp / "model.safetensors", unique_state(model).items(), metadata={"format": "pt"})
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
        tokenizer.save(tmp / "tokenizer.json")
        tensors = rng_state()
        meta: dict[str, Any] = {"train_state": train_state or {}}
        for describe in _EXTRA_STATE:  # e.g. the quantization record that rebuilds quantized modules on load
            meta.update(describe(model))
        if optimizer is not None:
            opt_tensors, opt_meta = _optimizer_state(optimizer)
            tensors.update(opt_tensors)
            meta["optimizer"] = opt_meta
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for name in FILES:
            fsync_file(tmp / name)  # the marker vouches for bytes that are on disk
        marker = {"files": {n: {"size": (tmp / n).stat().st_size, "sha256": file_sha256(tmp / n)} for n in FILES}}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    return Path(path)


# ----------------------------------------------------------------------------- find and verify


def load_weights(model: nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    refuse_pickles(ckpt)
    f = ckpt / "model.safetensors"
    check_safetensors_file(f)
    try:
        missing, unexpected = _st_load_model(model, str(f), strict=False, device=str(device))
    except (SafetensorError, RuntimeError) as exc:
        raise UserError(f"cannot load weights from {f}: {exc}") from None
    if missing or unexpected:
        raise UserError(
            f"{f} does not match its config.yaml: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    refuse_non_finite(model.state_dict(), ckpt)


def load_training_state(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from ``ckpt``; return the JSON ``train_state``."""
    load_weights(model, ckpt)
    check_safetensors_file(ckpt / "state.safetensors")
    try:
        tensors = load_file(str(ckpt / "state.safetensors"))
        meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read the training state in {ckpt}: {exc}") from None
    if optimizer is not None:
        if "optimizer" not in meta:
            raise UserError(f"{ckpt} has no optimizer state: it cannot be resumed")
        _load_optimizer_state(optimizer, tensors, meta["optimizer"])
    set_rng_state(tensors)
    return meta.get("train_state", {})

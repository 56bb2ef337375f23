"""Start a training run from existing weights: ``moelab train --init PATH``.

Why: upcycled, converted or previously trained models should be trained further with the same
trainer (metrics, checkpoints, resume) as models trained from scratch, instead of a hand-written
loop. The source is a moelab model folder (``moelab upcycle`` / ``moelab convert --to moelab``),
a Hugging Face folder (imported on the fly), a checkpoint folder or a run folder (its newest
complete checkpoint).

The run's model section is the source's model config (``--set model.…`` may change fields that
keep every weight's shape, e.g. dropout or loss coefficients); data/train come from
``--config``/``--preset`` when given, else from the source's run config when it is a checkpoint,
else from the ``tiny`` preset. The tokenizer is the source's ``tokenizer.json`` when it has one;
otherwise the data's tokenizer must have exactly the model's vocabulary size. Weights load
strictly: same names and shapes, or a one-line :class:`UserError`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from moelab.config import (
    ModelConfig,
    RunConfig,
    apply_overrides,
    from_dict,
    load_run_config,
    normalize_run_overrides,
    run_preset,
)
from moelab.data.tokenizer import Tokenizer, load_tokenizer
from moelab.errors import ConfigError, UserError
from moelab.train.checkpoint import MARKER, latest_checkpoint, refuse_non_finite


@dataclass
class InitSource:
    """The weights and configs found at ``--init PATH``."""

    path: Path
    model_cfg: ModelConfig
    state: dict[str, torch.Tensor]
    run_cfg: RunConfig | None  # the source's run config (checkpoints only)
    tokenizer: Tokenizer | None  # the source's tokenizer.json, when it has one


def _resolve(path: str | Path) -> Path:
    """The folder that holds the weights: ``path`` itself, or a run folder's newest checkpoint."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--init {str(p)!r} does not exist or is not a folder")
    if (p / "config.json").is_file() or (p / "model.safetensors").is_file() or (p / MARKER).exists():
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise UserError(
            f"--init {str(p)!r} is neither a model folder (config.yaml + model.safetensors, or a Hugging Face "
            "config.json) nor a run folder with a complete checkpoint"
        )
    return found


def _run_config(folder: Path) -> RunConfig | None:
    """The run config of a checkpoint folder (``data:``/``train:`` next to ``model:``), else None."""
    try:
        data = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or not ({"data", "train"} & set(data)):
        return None
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        raise UserError(f"{folder / 'config.yaml'}: {exc}") from None


def load_init_source(path: str | Path) -> InitSource:
    """Read the model (config + weights), run config and tokenizer at ``path``.

    Weights holding NaN or infinity are refused, naming the tensor, as every checkpoint load does
    (:func:`moelab.train.checkpoint.refuse_non_finite`): a run started from them would log NaN losses
    from step 1."""
    from moelab.convert.hf import load_any
    from moelab.model.transformer import Transformer

    folder = _resolve(path)
    model = load_any(folder)
    if not isinstance(model, Transformer):
        raise UserError(
            f"--init {str(folder)!r} holds a {type(model).__name__}: moelab train trains decoder-only models"
        )
    try:
        refuse_non_finite(model.state_dict(), folder)
    except UserError as exc:
        raise UserError(f"--init {exc}") from None
    tok_file = folder / "tokenizer.json"
    tokenizer = load_tokenizer(tok_file) if tok_file.is_file() else None
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return InitSource(folder, model.cfg, state, _run_config(folder), tokenizer)


def init_run_config(
    source: InitSource, config: str | None, preset: str | None, overrides: list[str]
) -> RunConfig:
    """The run: ``--config`` or ``--preset`` (else the source's run, else ``tiny``) with the source's model.

    ``overrides`` are ``--set`` items (``moe.x`` means ``model.moe.x``): data/train ones are applied
    before the model is swapped in, model ones after.
    """
    if config:
        base = load_run_config(config)
    elif preset:
        base = run_preset(preset)
    else:
        base = source.run_cfg if source.run_cfg is not None else run_preset("tiny")
    overrides = normalize_run_overrides(overrides)
    with contextlib.suppress(ConfigError):  # the base's data/train fit the source's model as they are
        return apply_overrides(replace(base, model=source.model_cfg), overrides)
    # else data/train overrides first, so that e.g. data.seq_len can be fitted to the source's max_seq_len
    model_keys = [o for o in overrides if o.strip().startswith("model.")]
    base = apply_overrides(base, [o for o in overrides if o not in model_keys])
    try:
        cfg = replace(base, model=source.model_cfg)
    except ConfigError as exc:
        raise UserError(f"--init {str(source.path)!r}: {exc} (fix it with --set)") from None
    return apply_overrides(cfg, model_keys)


def check_vocab(source: InitSource, tokenizer: Tokenizer) -> None:
    """The data's tokenizer must index the model's embedding rows one to one."""
    want = source.model_cfg.vocab_size
    if tokenizer.vocab_size != want:
        raise UserError(
            f"--init {str(source.path)!r} has vocab_size {want} but the data's tokenizer has {tokenizer.vocab_size} "
            f"entries: set data.tokenizer to a tokenizer.json with {want} entries (or data.tokenizer=bytes for 259)"
        )


def load_init_weights(model: torch.nn.Module, source: InitSource) -> None:
    """Copy the source's weights into ``model`` in place (the optimizer keeps its parameters); strict.

    A model with LoRA adapters takes the source's weights as its frozen base (adapters untouched)."""
    from moelab.model.lora import base_state_dict

    own = base_state_dict(model)
    missing = sorted(set(own) - set(source.state))
    unexpected = sorted(set(source.state) - set(own))
    shapes = [
        f"{k} {tuple(source.state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in source.state and source.state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {missing[:4]}" if missing else "",
            f"unexpected {unexpected[:4]}" if unexpected else "",
        ]
        parts.append(f"shape (--init vs run) {'; '.join(shapes[:3])}" if shapes else "")
        raise UserError(
            f"--init {str(source.path)!r} does not fit the run's model ({', '.join(p for p in parts if p)}): "
            "--set model.* may change only fields that keep the weights' shapes"
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(source.state[k].to(v.device, v.dtype))

"""``moelab train --init PATH``: read the starting weights, configs and tokenizer of any folder moelab loads.

The folder is a moelab model folder, a Hugging Face folder, a checkpoint or a run folder (its newest
complete checkpoint); the weights are streamed in their own dtype (:func:`moelab.convert.hf.load_any`) and
handed to the trainer as an :class:`~moelab.train.init.InitSource`, which moves them into the run's model.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moelab.checkpoint.folder import MARKER, latest_checkpoint, refuse_non_finite
from moelab.config import RunConfig, from_dict
from moelab.convert.hf import load_any
from moelab.data.tokenizer import load_tokenizer
from moelab.errors import ConfigError, UserError
from moelab.model.transformer import Transformer
from moelab.train.init import InitSource


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
    (:func:`moelab.checkpoint.folder.refuse_non_finite`): a run started from them would log NaN losses
    from step 1."""
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
    state = {k: v.detach() for k, v in model.state_dict().items()}  # the loaded tensors themselves: no copy
    return InitSource(folder, model.cfg, state, _run_config(folder), tokenizer)


__all__ = ["load_init_source"]

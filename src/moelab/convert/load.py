"""Any folder to a model: a training checkpoint, a run folder (its newest complete checkpoint), a moelab
model folder or a Hugging Face folder, quantized or LoRA checkpoints included.

Loading (:func:`load_model`) streams: the model is built on the meta device and each tensor allocated
once, in the dtype asked for (default: as stored, fp32 for what training writes), and copied from the
memory-mapped file (:mod:`moelab.model.materialize`). It sits at the convert layer because it maps every
folder kind moelab reads (Hugging Face families, quantized checkpoints) onto a model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from moelab.checkpoint.folder import (
    is_model_folder,
    read_run_config,
    refuse_non_finite,
    refuse_pickles,
    resolve_model_folder,
)
from moelab.config import ConfigError, from_dict
from moelab.data.tokenizer import Tokenizer, load_tokenizer
from moelab.errors import UserError
from moelab.model.materialize import Filler, ModuleLoaded, empty_model, fill_by_names, load_dtype
from moelab.safetensors_reader import SafetensorsReader


def _encoder_decoder(ckpt: Path) -> Callable[[], nn.Module] | None:
    """``build()`` of an EncoderDecoder when config.yaml holds one, else None (then it is a Transformer's run config).

    Recognised: an ``encoder_decoder:`` section (moelab folders, runs), or the
    EncoderDecoderConfig itself at the top (``save_checkpoint(path, model, enc_dec_cfg, tok)``).
    """
    try:
        data = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None  # read_run_config reports it
    if not isinstance(data, dict):
        return None
    from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig, encoder_decoder_section

    section = encoder_decoder_section(data)
    if section is None:
        return None

    try:
        cfg = from_dict(EncoderDecoderConfig, section)
    except ConfigError as exc:
        raise UserError(f"{ckpt / 'config.yaml'}: {exc}") from None
    return lambda: EncoderDecoder(cfg)


def stored_quantization(ckpt: Path) -> dict[str, Any] | None:
    """The ``quantization`` record in ``state.json`` (see ``moelab.quant.model``), or None."""
    try:
        return json.loads((ckpt / "state.json").read_text(encoding="utf-8")).get("quantization")
    except (OSError, ValueError, AttributeError):
        return None


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    on_module_loaded: ModuleLoaded | None = None,
):
    """``(model, Tokenizer)`` from a checkpoint folder, a run folder (newest complete checkpoint) or a
    model folder (:func:`is_model_folder`: moelab or Hugging Face), see :func:`load_checkpoint_model`.

    Raises UserError for a missing, damaged or pickle-bearing checkpoint, and for a folder without a
    tokenizer moelab can read.
    """
    folder = resolve_model_folder(path)
    tokenizer = folder_tokenizer(folder)  # before the slow load
    return _load_resolved(folder, device, dtype, on_module_loaded), tokenizer


def load_checkpoint_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    on_module_loaded: ModuleLoaded | None = None,
) -> tuple[nn.Module, Path]:
    """``(model, folder it was read from)``: the model of any folder :func:`load_model` takes, no tokenizer.

    An encoder–decoder checkpoint (see :func:`_encoder_decoder`) gives an ``EncoderDecoder``. The
    model is in eval mode on ``device``, in ``dtype`` (``"bf16"``/``"fp16"``/``"fp32"``; default the
    stored weights', fp32 for what training writes; routers stay fp32). It is streamed
    (:mod:`moelab.model.materialize`): built on the meta device, each tensor allocated once in its
    final dtype on ``device`` and copied from the memory-mapped file, so the peak is the weights once
    plus one tensor. ``on_module_loaded`` is called per module once its tensors are in (quantizing
    while loading uses it). Weights holding NaN or infinity are refused, naming the tensor.
    """
    folder = resolve_model_folder(path)
    return _load_resolved(folder, device, dtype, on_module_loaded), folder


def _load_resolved(
    ckpt: Path, device: str | torch.device, dtype: str | torch.dtype | None, on_module_loaded: ModuleLoaded | None
) -> nn.Module:
    """:func:`load_checkpoint_model` of a folder :func:`resolve_model_folder` returned."""
    refuse_pickles(ckpt)
    if is_model_folder(ckpt):
        from moelab.convert.hf import load_any

        model = load_any(ckpt, dtype, device, on_module_loaded)
        refuse_non_finite(model.state_dict(), ckpt)
        return model
    base = _encoder_decoder(ckpt)
    lora = None  # a LoRA run's train.lora: its checkpoint holds the frozen base and the adapters
    if base is None:
        from moelab.train.objective_step import build_model, objective_of

        run = read_run_config(ckpt)
        base = lambda: build_model(run.model, objective_of(run))  # noqa: E731  (span: an encoder-decoder)
        lora = run.train.lora if run.train.lora.enabled else None
    quant = stored_quantization(ckpt)

    def build() -> nn.Module:
        model = base()
        if quant is not None:  # written by `moelab quantize`: the quantized modules, empty, before loading
            from moelab.quant.model import prepare_quantized

            prepare_quantized(model, quant)
        if lora is not None:  # a LoRA run: the frozen base and its adapters, as the trainer held them
            from moelab.model.lora import apply_lora

            apply_lora(model, lora)
        return model

    f = ckpt / "model.safetensors"
    hook = None if lora is not None else on_module_loaded  # adapters are folded in first, then the hook runs
    reader = SafetensorsReader([f])
    if lora is not None:  # a checkpoint of the first LoRA version names tensors as torch parametrizations did
        from moelab.model.lora import legacy_name

        reader = reader.renamed({k: legacy_name(k) for k in reader})
    with reader:
        model = empty_model(build, load_dtype(dtype, reader.float_dtype()), device)
        fill_by_names(Filler(model, device, str(f), hook), reader, reader.in_file_order())
    if lora is not None:
        from moelab.model.lora import merge_lora

        merge_lora(model)  # W + (alpha/rank)·B·A: a plain model for every fast path and export
        if on_module_loaded is not None:
            for path, module in list(model.named_modules()):
                on_module_loaded(model, path, module)
    refuse_non_finite(model.state_dict(), ckpt)
    return model.eval()


def folder_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer beside a model: ``tokenizer.json``, or one made from a sentencepiece ``tokenizer.model``
    (see :mod:`moelab.convert.tokenizer_files`); UserError saying what to add when neither can be read."""
    tok = folder / "tokenizer.json"
    if tok.is_file():
        return load_tokenizer(tok)
    if (folder / "tokenizer.model").is_file():
        from moelab.convert.tokenizer_files import sentencepiece_to_json
        from moelab.data.tokenizer import tokenizer_from_json

        return tokenizer_from_json(sentencepiece_to_json(folder))
    raise UserError(
        f"{folder} has no tokenizer.json: put the tokenizer the model was trained with beside model.safetensors "
        "(moelab's conversion commands copy it from their source folder)"
    )

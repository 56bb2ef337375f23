"""Hugging Face interop: import a local HF folder into moelab, export a moelab model to one.

A Hugging Face folder is ``config.json`` plus safetensors weights (one file, or shards listed
in ``model.safetensors.index.json``). Import reads ``model_type``, translates the config with
the family's :mod:`~moelab.convert.families` entry (refusing what moelab cannot reproduce), and
moves every tensor with the family's mapping table (:mod:`~moelab.convert.tables`); a missing
or unexpected tensor is an error listing the names. Export is the same tables run backwards and
writes a folder ``transformers.AutoModelForCausalLM.from_pretrained`` loads, sharded past
``max_shard_size`` (:mod:`~moelab.convert.hf_files`).

A *moelab folder* is ``model.safetensors`` (tied weights stored once) plus ``config.yaml`` with
a ``model:`` section, the model part of a training checkpoint.

Loading streams (:mod:`moelab.model.materialize`): the model is built on the meta device in the
load dtype (``dtype``: ``"bf16"``/``"fp16"``/``"fp32"``; default the stored weights'), then each
parameter is allocated once and filled from the tensors its mapping rule reads, one rule at a time
(:func:`~moelab.convert.rules.fill_model`), through a memory-mapped reader
(:mod:`moelab.safetensors_reader`). Peak memory: the weights once at the load dtype, plus one rule's
tensors and a bounded window of mapped file pages. Exports stream the other way
(:mod:`moelab.safetensors_writer`): nothing holds a second copy of the model.

Writing follows :mod:`moelab.outputs`: every folder is written into a temporary sibling and renamed
into place, and an existing folder is replaced only when it holds nothing but a model folder's
files (:data:`MODEL_FOLDER`). :func:`export_hf` and :func:`save_moelab` replace such a folder by
default (library calls re-export); the commands go through :func:`write_model_folder`, which
refuses any non-empty folder unless asked to overwrite and never writes onto its source.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from moelab.config import ModelConfig, from_dict, to_dict
from moelab.convert.families import FAMILIES, default_family
from moelab.convert.hf_files import (
    DEFAULT_MAX_SHARD_SIZE,
    PICKLE_FILES,
    load_dtype,
    open_hf_weights,
    read_hf_config,
    write_hf_config,
    write_hf_weights,
)
from moelab.convert.rules import build_rules, fill_model, iter_export
from moelab.convert.tokenizer_files import TOKENIZER_FILES, copy_tokenizer
from moelab.errors import UserError
from moelab.model.encoder_decoder import (
    ENCODER_DECODER_SECTION,
    EncoderDecoder,
    EncoderDecoderConfig,
    encoder_decoder_section,
)
from moelab.model.materialize import Filler, ModuleLoaded, empty_model, fill_by_names
from moelab.model.transformer import Transformer
from moelab.outputs import OutputKind, check_output, files_kind, staged_folder
from moelab.safetensors_reader import INDEX_FILE, SafetensorsReader
from moelab.safetensors_writer import SHARD_NAME, unique_state, write_safetensors

DType = str | torch.dtype | None  # "bf16" | "fp16" | "fp32" | a torch dtype | None (the stored weights')


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def read_hf_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json dict, every tensor)`` of a local HF folder, read eagerly; safetensors only.

    The plain reference the streaming import is tested against; loaders use :func:`import_hf`.
    """
    with open_hf_weights(path) as reader:
        return read_hf_config(path), {k: reader[k].clone() for k in reader.in_file_order()}


def _model_keys(model: Transformer) -> list[str]:
    keys = list(model.state_dict().keys())
    return [k for k in keys if not (model.cfg.tie_embeddings and k == "lm_head.weight")]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The moelab config of an HF config.json dict (ConfigError for unknown families or options)."""
    return FAMILIES[hf.get("model_type", "<missing>")].config_in(hf)


def import_hf(
    path: str | Path,
    dtype: DType = None,
    device: str | torch.device = "cpu",
    on_module_loaded: ModuleLoaded | None = None,
) -> Transformer:
    """Load a local Hugging Face folder as a moelab :class:`Transformer` in eval mode, streamed (module doc).

    ``dtype``: the load dtype (default: the stored weights'; routers stay fp32). Encoder–decoder
    families (T5, Switch Transformers) give an :class:`EncoderDecoder` instead. ``on_module_loaded``:
    see :class:`~moelab.model.materialize.Filler`.
    """
    p = Path(path)
    hf = read_hf_config(p)
    family = FAMILIES[hf.get("model_type", "<missing>")]
    reader = open_hf_weights(p)
    if not family.seq2seq and not any(k.startswith(family.base_prefix) for k in reader):
        # saved from the base model (e.g. GPT2Model)
        reader = reader.renamed({k: family.base_prefix + k for k in reader if not k.startswith("lm_head.")})
    with reader:
        target = load_dtype(dtype, reader)
        if family.seq2seq:
            from moelab.convert.families.t5 import import_seq2seq

            return import_seq2seq(family, hf, reader, target, device, str(p), on_module_loaded)  # type: ignore[return-value]
        cfg = family.config_in(hf)
        model = empty_model(lambda: Transformer(cfg), target, device)
        rules = build_rules(family.tables(hf), cfg, _model_keys(model))
        tied_head = "lm_head.weight"  # every supported family names its output head so; tied: may be absent

        def ignore(name: str) -> bool:
            return family.ignore(name, cfg) or (cfg.tie_embeddings and name == tied_head)

        fill_model(Filler(model, device, str(p), on_module_loaded), rules, reader, ignore)
    return model.eval()


def export_hf(
    model: Transformer,
    path: str | Path,
    family: str | None = None,
    overwrite: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``model`` as a Hugging Face folder of ``family`` (default: the one its options match), atomically,
    in the model's dtype, sharded past ``max_shard_size`` (bytes, or "5GB", "500MB"…).

    An existing folder is replaced only when ``overwrite`` and it holds nothing but a model folder's files.
    """
    with staged_folder(path, MODEL_FOLDER, overwrite=overwrite) as tmp:
        _write_hf(model, tmp, family, max_shard_size)
    return Path(path)


def _write_hf(model: Transformer, path: Path, family: str | None, max_shard_size: int | str) -> None:
    if isinstance(model, EncoderDecoder):
        from moelab.convert.families.t5 import export_seq2seq

        export_seq2seq(model, path, family, max_shard_size)
        return
    cfg = model.cfg
    fam = FAMILIES[family or default_family(cfg)]
    hf = fam.config_out(cfg)
    rules = build_rules(fam.tables(hf), cfg, _model_keys(model))
    dtype = write_hf_weights(path, lambda state: iter_export(rules, state), model.state_dict(), max_shard_size)
    write_hf_config(path, hf, dtype)


MODEL_FILES = ("model.safetensors", "config.yaml", "config.json", INDEX_FILE)


def _model_folder_kind() -> OutputKind:
    """Files a conversion writes: :data:`MODEL_FILES`, tokenizer files and ``model-0000i-of-0000n`` shards."""
    named = files_kind("model folder", (*MODEL_FILES, *TOKENIZER_FILES))

    def foreign(entry: Path) -> Path | None:
        if SHARD_NAME.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            return None
        return named.foreign(entry)

    return OutputKind(named.name, foreign)


MODEL_FOLDER = _model_folder_kind()  # what conversions write


def check_model_output(out: str | Path, src: str | Path, overwrite: bool = False) -> None:
    """Refuse, before any slow work, a model-folder output that could lose data (see :func:`write_model_folder`)."""
    check_output(out, MODEL_FOLDER, overwrite=overwrite, sources=[src])


def write_model_folder(
    model: Transformer,
    out: str | Path,
    to: str,
    src: str | Path,
    family: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Write ``model`` to ``out`` as a ``to`` ("moelab" | "hf") folder with the tokenizer of folder ``src``
    beside it, atomically; return the tokenizer files copied (or made, see
    :func:`~moelab.convert.tokenizer_files.copy_tokenizer`). ``max_shard_size`` shards an HF export.

    The rule of every writing command (:mod:`moelab.outputs`): ``out`` must not be, lie inside or hold
    ``src``; a non-empty ``out`` is refused unless ``overwrite``, and then only when it holds nothing
    but a model folder's files.
    """
    with staged_folder(out, MODEL_FOLDER, overwrite=overwrite, sources=[src]) as tmp:
        if to == "hf":
            _write_hf(model, tmp, family, max_shard_size)
        else:
            _write_moelab(model, tmp)
        return copy_tokenizer(src, tmp, to)


# --------------------------------------------------------------------------- moelab folders


def save_moelab(model: Transformer, path: str | Path, overwrite: bool = True) -> Path:
    """``model.safetensors`` + ``config.yaml`` (``model:`` section; ``encoder_decoder:`` for an EncoderDecoder),
    written atomically; an existing folder is replaced only when ``overwrite`` and it holds nothing but a
    model folder's files."""
    with staged_folder(path, MODEL_FOLDER, overwrite=overwrite) as tmp:
        _write_moelab(model, tmp)
    return Path(path)


def _write_moelab(model: Transformer, out: Path) -> None:
    write_safetensors(out / "model.safetensors", unique_state(model).items(), metadata={"format": "pt"})
    section = ENCODER_DECODER_SECTION if isinstance(model, EncoderDecoder) else "model"
    (out / "config.yaml").write_text(
        yaml.safe_dump({section: to_dict(model.cfg)}, sort_keys=False), encoding="utf-8"
    )


def moelab_builder(data: Mapping[str, Any]):
    """``build()`` of the model a moelab ``config.yaml`` (parsed) describes: an EncoderDecoder for an
    ``encoder_decoder:`` section (or an EncoderDecoderConfig at the top), else a Transformer."""
    section = encoder_decoder_section(data)
    if section is not None:
        enc = from_dict(EncoderDecoderConfig, section)
        return lambda: EncoderDecoder(enc)
    cfg = from_dict(ModelConfig, data.get("model", data))
    return lambda: Transformer(cfg)


def load_moelab(
    path: str | Path,
    dtype: DType = None,
    device: str | torch.device = "cpu",
    on_module_loaded: ModuleLoaded | None = None,
) -> Transformer:
    """A moelab folder (or training checkpoint folder) → Transformer in eval mode, streamed (module doc)."""
    p = Path(path)
    if not (p / "config.yaml").is_file() or not (p / "model.safetensors").is_file():
        raise UserError(f"{p} is not a moelab model folder: it needs config.yaml and model.safetensors")
    data = yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8")) or {}
    build = moelab_builder(data)
    with SafetensorsReader([p / "model.safetensors"]) as reader:
        model = empty_model(build, load_dtype(dtype, reader), device)
        filler = Filler(model, device, f"{p}/model.safetensors", on_module_loaded)
        fill_by_names(filler, reader, reader.in_file_order())
    return model.eval()


def load_any(
    path: str | Path,
    dtype: DType = None,
    device: str | torch.device = "cpu",
    on_module_loaded: ModuleLoaded | None = None,
) -> Transformer:
    """A moelab folder or a Hugging Face folder (see :func:`import_hf` and :func:`load_moelab`)."""
    load = import_hf if is_hf_folder(path) else load_moelab
    return load(path, dtype, device, on_module_loaded)


__all__ = [
    "MODEL_FOLDER",
    "PICKLE_FILES",
    "TOKENIZER_FILES",
    "check_model_output",
    "copy_tokenizer",
    "export_hf",
    "import_hf",
    "load_any",
    "load_moelab",
    "read_hf_folder",
    "save_moelab",
    "write_model_folder",
]

"""Hugging Face interop: import a local HF folder into moelab, export a moelab model to one.

A Hugging Face folder is ``config.json`` plus safetensors weights (one file, or shards listed
in ``model.safetensors.index.json``). Import reads ``model_type``, translates the config with
the family's :mod:`~moelab.convert.families` entry (refusing what moelab cannot reproduce), and
moves every tensor with the family's mapping table (:mod:`~moelab.convert.tables`); a missing
or unexpected tensor is an error listing the names. Export is the same tables run backwards and
writes a folder ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

A *moelab folder* is ``model.safetensors`` (tied weights stored once) plus ``config.yaml`` with
a ``model:`` section, the model part of a training checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from moelab.config import ModelConfig, from_dict, to_dict
from moelab.convert.families import FAMILIES, default_family
from moelab.convert.rules import build_rules, export_tensors, import_tensors
from moelab.errors import UserError
from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from moelab.model.transformer import Transformer

ENCODER_DECODER_SECTION = "encoder_decoder"  # config.yaml section of an EncoderDecoder (instead of model:)
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def read_hf_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json dict, every tensor)`` of a local HF folder; safetensors only (never unpickles)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{p} is not a Hugging Face model folder: config.json is missing")
    hf = json.loads((p / "config.json").read_text(encoding="utf-8"))
    index = p / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = sorted(f.name for f in p.glob("*.safetensors"))
    if not files:
        pickled = [n for n in PICKLE_FILES if (p / n).exists()]
        hint = f" (found {', '.join(pickled)}: re-save it with safe_serialization=True)" if pickled else ""
        raise UserError(f"{p} has no .safetensors weights{hint}; moelab never loads pickled weights")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(p / name))
        except (SafetensorError, FileNotFoundError, OSError) as exc:
            raise UserError(f"cannot read {p / name}: {exc}") from None
    return hf, tensors


def _model_keys(model: Transformer) -> list[str]:
    keys = list(model.state_dict().keys())
    return [k for k in keys if not (model.cfg.tie_embeddings and k == "lm_head.weight")]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The moelab config of an HF config.json dict (ConfigError for unknown families or options)."""
    return FAMILIES[hf.get("model_type", "<missing>")].config_in(hf)


def import_hf(path: str | Path) -> Transformer:
    """Load a local Hugging Face folder as a moelab :class:`Transformer` (fp32, eval mode).

    Encoder–decoder families (T5, Switch Transformers) give an :class:`EncoderDecoder` instead.
    """
    hf, tensors = read_hf_folder(path)
    family = FAMILIES[hf.get("model_type", "<missing>")]
    if family.seq2seq:
        from moelab.convert.families.t5 import import_seq2seq

        return import_seq2seq(family, hf, tensors)  # type: ignore[return-value]
    cfg = family.config_in(hf)
    if not any(
        k.startswith(family.base_prefix) for k in tensors
    ):  # saved from the base model (e.g. GPT2Model)
        tensors = {k if k.startswith("lm_head.") else family.base_prefix + k: v for k, v in tensors.items()}
    model = Transformer(cfg)
    rules = build_rules(family.tables(hf), cfg, _model_keys(model))
    tied_head = "lm_head.weight"  # every supported family names its output head so; tied: may be absent

    def ignore(name: str) -> bool:
        return family.ignore(name, cfg) or (cfg.tie_embeddings and name == tied_head)

    state = import_tensors(rules, tensors, ignore)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True
    )
    return model.eval()


def export_hf(model: Transformer, path: str | Path, family: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder of ``family`` (default: the one its options match)."""
    if isinstance(model, EncoderDecoder):
        from moelab.convert.families.t5 import export_seq2seq

        return export_seq2seq(model, path, family)
    cfg = model.cfg
    fam = FAMILIES[family or default_family(cfg)]
    hf = fam.config_out(cfg)
    rules = build_rules(fam.tables(hf), cfg, _model_keys(model))
    tensors = export_tensors(rules, model.state_dict())
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    return out


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def copy_tokenizer(src: str | Path, dst: str | Path, to: str) -> list[str]:
    """Copy the tokenizer files of folder ``src`` beside a model written to ``dst``; return their names.

    Why: every conversion keeps the vocabulary, so the written folder is only usable by
    ``generate``, ``serve`` or ``train --init`` with the source's tokenizer beside it. moelab's
    bytes tokenizer file is not a Hugging Face file, so a ``to="hf"`` export leaves it out
    rather than write a ``tokenizer.json`` that ``AutoTokenizer`` cannot read.
    """
    from moelab.data.tokenizer import is_bytes_tokenizer_file

    src, dst = Path(src), Path(dst)
    if not src.is_dir() or src.resolve() == dst.resolve():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        f = src / name
        if not f.is_file():
            continue
        if to == "hf" and name == "tokenizer.json" and is_bytes_tokenizer_file(f):
            continue
        shutil.copyfile(f, dst / name)
        copied.append(name)
    return copied


# --------------------------------------------------------------------------- moelab folders


def save_moelab(model: Transformer, path: str | Path) -> Path:
    """``model.safetensors`` + ``config.yaml`` (``model:`` section; ``encoder_decoder:`` for an EncoderDecoder)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    st_save_model(model, str(out / "model.safetensors"))
    section = ENCODER_DECODER_SECTION if isinstance(model, EncoderDecoder) else "model"
    (out / "config.yaml").write_text(
        yaml.safe_dump({section: to_dict(model.cfg)}, sort_keys=False), encoding="utf-8"
    )
    return out


def load_moelab(path: str | Path) -> Transformer:
    """A moelab folder (or training checkpoint folder) → Transformer in eval mode."""
    p = Path(path)
    if not (p / "config.yaml").is_file() or not (p / "model.safetensors").is_file():
        raise UserError(f"{p} is not a moelab model folder: it needs config.yaml and model.safetensors")
    data = yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8")) or {}
    if ENCODER_DECODER_SECTION in data or {"encoder", "decoder"} <= set(data):  # folder / save_checkpoint
        model = EncoderDecoder(from_dict(EncoderDecoderConfig, data.get(ENCODER_DECODER_SECTION, data)))
    else:
        model = Transformer(from_dict(ModelConfig, data.get("model", data)))
    missing, unexpected = st_load_model(model, str(p / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise UserError(
            f"{p}/model.safetensors does not match its config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return model.eval()


def load_any(path: str | Path) -> Transformer:
    """A moelab folder or a Hugging Face folder."""
    return import_hf(path) if is_hf_folder(path) else load_moelab(path)

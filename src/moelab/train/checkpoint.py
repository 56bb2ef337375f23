"""Checkpoints: safetensors + JSON + YAML, written atomically, never unpickled.

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

Loading (:func:`load_model`) takes a checkpoint, a run folder or a model folder, and streams: the
model is built on the meta device and each tensor allocated once, in the dtype asked for (default:
as stored, fp32 for what training writes), and copied from the memory-mapped file
(:mod:`moelab.model.materialize`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as _st_load_model
from torch import nn

from moelab.config import ConfigError, ModelConfig, RunConfig, from_dict, to_dict
from moelab.data.tokenizer import Tokenizer, load_tokenizer
from moelab.errors import UserError
from moelab.model.materialize import Filler, ModuleLoaded, empty_model, fill_by_names, load_dtype
from moelab.outputs import TMP_PREFIX, discard, files_kind, fsync_file, staged_folder
from moelab.safetensors_reader import SafetensorsReader
from moelab.safetensors_writer import unique_state, write_safetensors

MARKER = "COMPLETE"
FILES = ("model.safetensors", "config.yaml", "tokenizer.json", "state.safetensors", "state.json")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
CKPT_PREFIX = "step_"
CHECKPOINT = files_kind("checkpoint", (*FILES, MARKER))  # what a checkpoint folder holds (moelab.outputs)


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- optimizer/RNG state without pickle


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
    and the RNG states go to ``state.safetensors``. An existing *checkpoint* at ``path`` is
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
        from moelab.quant.model import quantization_record  # quantized modules: how to rebuild them on load

        if (quant := quantization_record(model)) is not None:
            meta["quantization"] = quant
        if optimizer is not None:
            opt_tensors, opt_meta = _optimizer_state(optimizer)
            tensors.update(opt_tensors)
            meta["optimizer"] = opt_meta
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for name in FILES:
            fsync_file(tmp / name)  # the marker vouches for bytes that are on disk
        marker = {"files": {n: {"size": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in FILES}}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    return Path(path)


# ----------------------------------------------------------------------------- find and verify


def refuse_pickles(folder: Path) -> None:
    """Raise when ``folder`` holds pickle-bearing files: moelab never unpickles."""
    bad = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if bad:
        raise UserError(
            f"{folder} holds pickle files ({', '.join(bad)}); moelab never loads pickles because they can run "
            "code: convert the weights to safetensors first"
        )


def _check_safetensors(path: Path) -> None:
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
        if _sha256(f) != info["sha256"]:
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


def load_weights(model: nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    refuse_pickles(ckpt)
    f = ckpt / "model.safetensors"
    _check_safetensors(f)
    try:
        missing, unexpected = _st_load_model(model, str(f), strict=False, device=str(device))
    except (SafetensorError, RuntimeError) as exc:
        raise UserError(f"cannot load weights from {f}: {exc}") from None
    if missing or unexpected:
        raise UserError(
            f"{f} does not match its config.yaml: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    refuse_non_finite(model.state_dict(), ckpt)


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


def is_model_folder(p: Path) -> bool:
    """A folder of weights without training state, written by ``convert``/``upcycle``/``moefy``/
    ``merge``/``prune`` (``config.yaml`` + ``model.safetensors``) or a Hugging Face folder.

    Training checkpoints carry ``state.json`` and a completion marker; these folders carry neither
    (an unmarked training checkpoint is still refused as half-written)."""
    if not p.is_dir() or (p / MARKER).exists() or (p / "state.json").exists():
        return False
    from moelab.convert.hf import is_hf_folder

    return is_hf_folder(p) or ((p / "config.yaml").is_file() and (p / "model.safetensors").is_file())


def resolve_model_folder(path: str | Path) -> Path:
    """The folder whose weights ``path`` names: a model folder as it is, else the checkpoint
    :func:`resolve_checkpoint` finds (a run folder's newest complete one)."""
    p = Path(path)
    if is_model_folder(p):
        return p
    if not p.exists():
        raise UserError(f"{p} does not exist: give a model folder (moelab or Hugging Face), a checkpoint or a run folder")
    return resolve_checkpoint(p)


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


def load_training_state(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from ``ckpt``; return the JSON ``train_state``."""
    load_weights(model, ckpt)
    _check_safetensors(ckpt / "state.safetensors")
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

"""Checkpoint or model folder → quantized checkpoint (``moelab quantize``), quantized while it streams in.

The output is an ordinary checkpoint folder (``save_checkpoint``: safetensors, atomic, hashed,
no pickle) whose ``state.json`` carries the ``quantization`` record, so
``moelab.convert.load.load_model`` rebuilds the quantized modules and loads it directly.
It has no optimizer state: a quantized model is for inference, not for resuming training.

Sources: a training checkpoint, a run folder (its newest complete checkpoint), or a model folder
(``moelab convert``/``upcycle``/… output, or a Hugging Face folder), which has no completion marker.

Streaming (:func:`quantize_while_loading`): the model is built on the meta device and each module to
quantize is replaced by its quantized copy as soon as its weights are in, before the next module is
read, so the full-precision weights of all experts are never held at once: the peak is the quantized
model, the weights kept in floating point (embeddings, norms, routers, attention with
``only='experts'``) and one module in floating point. Float parts load in ``dtype`` (default: the
stored weights'); scales keep that dtype. The result is bitwise the one of loading the whole model
and calling :func:`~moelab.quant.model.quantize_model`.

The output follows :mod:`moelab.outputs`: ``out`` must not be, lie inside, or hold the source
(the checkpoint, the folder given, or the run whose ``checkpoints/`` hold it), and a non-empty
``out`` is refused before the slow load unless ``overwrite`` (then only a checkpoint there is replaced).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from moelab.errors import UserError
from moelab.model.surgery import set_module, weight_modules
from moelab.moe.experts import Experts
from moelab.outputs import check_output
from moelab.quant.experts import QuantExperts
from moelab.quant.linear import QuantLinear
from moelab.quant.model import quantization_record
from moelab.quant.spec import QuantConfig


@dataclass(frozen=True)
class QuantizeReport:
    source: Path
    out: Path
    config: QuantConfig
    bytes_before: int  # model.safetensors sizes
    bytes_after: int
    modules: int

    def summary(self) -> str:
        group = f", group {self.config.group_size}" if self.config.bits == 4 else ", per output channel"
        return (
            f"quantized {self.modules} modules ({self.config.only}) of {self.source} to int{self.config.bits}{group}: "
            f"weights {self.bytes_before / 2**20:.2f} MiB → {self.bytes_after / 2**20:.2f} MiB; wrote {self.out}"
        )


def sources_of(src: str | Path, ckpt: Path) -> list[Path]:
    """What an output must keep clear of: the path given, the checkpoint it resolved to and, for a
    checkpoint inside a run's ``checkpoints/``, that run (a quantized copy there would be resumed)."""
    found = [Path(src), ckpt]
    if ckpt.parent.name == "checkpoints":
        found.append(ckpt.parent.parent)
    return found


class QuantizeWhileLoading:
    """The ``on_module_loaded`` hook of a streaming load that quantizes as modules arrive.

    The modules it quantizes are those :func:`~moelab.quant.model.quantize_model` would (experts;
    with ``only='all'`` every linear outside routers), found on the meta model at the first call;
    a model with none is refused then, before the rest is read.
    """

    def __init__(self, cfg: QuantConfig) -> None:
        self.cfg = cfg
        self.targets: set[str] | None = None
        self.count = 0

    def __call__(self, model: nn.Module, path: str, module: nn.Module) -> None:
        if self.targets is None:
            self.targets = {p for p, _ in weight_modules(model, linears=self.cfg.only == "all")}
            if not self.targets:
                raise UserError(
                    f"nothing to quantize with only={self.cfg.only!r}: the model has no experts (use only='all')"
                )
        if path not in self.targets:
            return
        with torch.no_grad():
            if isinstance(module, Experts):
                new: nn.Module = QuantExperts.from_experts(module, self.cfg.bits, self.cfg.group_size)
            else:
                new = QuantLinear.from_linear(module, self.cfg.bits, self.cfg.group_size)  # type: ignore[arg-type]
        set_module(model, path, new)  # the float module is dropped here
        self.count += 1


def quantize_while_loading(
    src: str | Path, cfg: QuantConfig, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Path]:
    """``(quantized model, folder read)`` of any folder ``load_model`` takes, quantized as it streams in."""
    from moelab.convert.load import load_checkpoint_model

    hook = QuantizeWhileLoading(cfg)
    model, folder = load_checkpoint_model(src, device, dtype, hook)
    if hook.count == 0:
        raise UserError(f"nothing to quantize with only={cfg.only!r} in {folder}")
    model.quant_config = cfg  # type: ignore[assignment]
    return model.eval(), folder


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    bits: int,
    group_size: int = 32,
    only: str = "experts",
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
) -> QuantizeReport:
    """Quantize ``src`` (checkpoint, run folder or model folder) while loading it (``dtype``: the float
    parts' dtype, default the stored weights') and save it to ``out`` (see the module doc for ``overwrite``)."""
    from moelab.checkpoint.folder import CHECKPOINT, is_model_folder, read_run_config, resolve_model_folder
    from moelab.checkpoint.state import save_checkpoint
    from moelab.convert.load import folder_tokenizer, stored_quantization

    cfg = QuantConfig(bits=bits, group_size=group_size, only=only)  # validate before the slow load
    folder = resolve_model_folder(src)
    sources = sources_of(src, folder)
    check_output(out, CHECKPOINT, overwrite=overwrite, sources=sources)
    if stored_quantization(folder) is not None:
        raise UserError(f"{folder} is already quantized: quantize the full-precision checkpoint it came from")
    tokenizer = folder_tokenizer(folder)
    model, _ = quantize_while_loading(folder, cfg, dtype)
    config = run_config_for(model.cfg) if is_model_folder(folder) else read_run_config(folder)
    record_source = {"quantized_from": str(folder)}
    final = save_checkpoint(out, model, config, tokenizer, train_state=record_source, overwrite=overwrite)
    record = quantization_record(model) or {"modules": {}}
    return QuantizeReport(
        folder,
        final,
        cfg,
        _weight_bytes(folder),
        (final / "model.safetensors").stat().st_size,
        len(record["modules"]),
    )


def run_config_for(cfg):
    """The ``config.yaml`` of a checkpoint made from a model folder (which has no run config): a run with
    this model and default data whose ``seq_len`` fits the model, so eval and analyze read it too; an
    encoder–decoder's own config as it is (checkpoint loading recognises it)."""
    from moelab.config import DataConfig, ModelConfig, RunConfig

    if not isinstance(cfg, ModelConfig):
        return cfg
    data = DataConfig()
    return RunConfig(model=cfg, data=replace(data, seq_len=min(data.seq_len, cfg.max_seq_len)))


def _weight_bytes(folder: Path) -> int:
    """Bytes of a folder's safetensors weights (one file or shards)."""
    from moelab.safetensors_reader import folder_weight_files

    return sum(f.stat().st_size for f in folder_weight_files(folder))

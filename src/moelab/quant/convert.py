"""Checkpoint → quantized checkpoint (``moelab quantize``).

The output is an ordinary checkpoint folder (``save_checkpoint``: safetensors, atomic, hashed,
no pickle) whose ``state.json`` carries the ``quantization`` record, so
``moelab.train.checkpoint.load_model`` rebuilds the quantized modules and loads it directly.
It has no optimizer state: a quantized model is for inference, not for resuming training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moelab.errors import UserError
from moelab.quant.model import quantization_record, quantize_model
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


def quantize_checkpoint(src: str | Path, out: str | Path, bits: int, group_size: int = 32, only: str = "experts") -> QuantizeReport:
    """Load ``src`` (checkpoint or run folder), quantize, and save to ``out``."""
    from moelab.train.checkpoint import load_model, read_run_config, resolve_checkpoint, save_checkpoint

    cfg = QuantConfig(bits=bits, group_size=group_size, only=only)  # validate before the slow load
    ckpt = resolve_checkpoint(src)
    model, tokenizer = load_model(ckpt)
    if quantization_record(model) is not None:
        raise UserError(f"{ckpt} is already quantized: quantize the full-precision checkpoint it came from")
    quantize_model(model, cfg.bits, cfg.group_size, cfg.only)
    record_source = {"quantized_from": str(ckpt)}
    final = save_checkpoint(out, model, read_run_config(ckpt), tokenizer, train_state=record_source)
    record = quantization_record(model) or {"modules": {}}
    return QuantizeReport(
        ckpt,
        final,
        cfg,
        (ckpt / "model.safetensors").stat().st_size,
        (final / "model.safetensors").stat().st_size,
        len(record["modules"]),
    )

"""Quantize a model in place, describe what was quantized, and rebuild that structure to load.

The record (JSON, stored in a checkpoint's ``state.json`` under ``quantization``) lists every
replaced module by its path with the arguments that rebuild it empty, so loading does not
re-derive anything from the config and a checkpoint quantized with any scope loads the same way:

    {"format": "moelab-weight-only", "version": 1, "bits": 4, "group_size": 32, "only": "all",
     "modules": {"blocks.0.ffn.experts": {"kind": "experts", ...}, "lm_head": {"kind": "linear", ...}}}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moelab.checkpoint.state import register_extra_state
from moelab.errors import UserError
from moelab.model.surgery import set_module, weight_modules
from moelab.moe.experts import Experts
from moelab.quant.experts import QuantExperts
from moelab.quant.linear import QuantLinear
from moelab.quant.spec import RECORD_FORMAT, RECORD_VERSION, QuantConfig


def quantize_model(model: nn.Module, bits: int = 8, group_size: int = 32, only: str = "experts") -> nn.Module:
    """Replace experts (and with ``only='all'`` attention, dense FFN and LM-head linears) by
    weight-only quantized modules, in place; returns ``model`` in eval mode.

    Routers and embeddings stay in floating point. A tied LM head becomes its own quantized
    matrix (the embedding keeps full precision). Raises ConfigError for unsupported bits,
    group sizes or scopes.
    """
    cfg = QuantConfig(bits=bits, group_size=group_size, only=only)
    targets = weight_modules(model, linears=cfg.only == "all")
    if not targets:
        raise UserError(f"nothing to quantize with only={only!r}: the model has no experts (use only='all')")
    for path, mod in targets:
        if isinstance(mod, Experts):
            new: nn.Module = QuantExperts.from_experts(mod, cfg.bits, cfg.group_size)
        else:
            new = QuantLinear.from_linear(mod, cfg.bits, cfg.group_size)  # type: ignore[arg-type]
        set_module(model, path, new)
    model.quant_config = cfg  # type: ignore[assignment]
    return model.eval()


@torch.no_grad()
def prepack(model: nn.Module) -> nn.Module:
    """Pack every quantized weight for the kernel of the device it is on now, instead of on its first call.

    For decode loops and ``torch.compile``: after this, forward never mutates a buffer.
    """
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.pack_for(mod.qweight.device)
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace quantized modules by full-precision ones holding ŵ, in place (same outputs up to
    float rounding: the kernels are tested equal to dequantize-then-F.linear). For exporting a
    quantized model, and for evaluating its quality fast: the weight-only kernels are made for
    decode-sized batches, not for scoring long sequences."""
    for path, mod in list(model.named_modules()):
        if isinstance(mod, QuantExperts):
            experts = Experts(mod.num_experts, mod.d_model, mod.hidden, mod.activation)
            for e in range(mod.num_experts):
                experts.w_up[e] = mod.up[e].dequantized_weight()
                experts.w_down[e] = mod.down[e].dequantized_weight()
            set_module(model, path, experts.to(mod.up[0].qweight.device))
    for path, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.copy_(mod.dequantized_weight())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
            set_module(model, path, lin.to(mod.qweight.device))
    if hasattr(model, "quant_config"):
        del model.quant_config
    return model


def quantization_record(model: nn.Module) -> dict[str, Any] | None:
    """The JSON record of a quantized model, or None when nothing in it is quantized."""
    modules: dict[str, dict[str, Any]] = {}
    for path, mod in model.named_modules():
        if isinstance(mod, QuantExperts):
            modules[path] = {
                "kind": "experts",
                "num_experts": mod.num_experts,
                "d_model": mod.d_model,
                "hidden": mod.hidden,
                "activation": mod.activation,
                "bits": mod.bits,
                "group_size": mod.group_size,
            }
        elif isinstance(mod, QuantLinear) and not any(path.startswith(p + ".") for p in modules):
            modules[path] = {
                "kind": "linear",
                "in_features": mod.in_features,
                "out_features": mod.out_features,
                "bits": mod.bits,
                "group_size": mod.group_size,
                "bias": mod.bias is not None,
            }
    if not modules:
        return None
    cfg = getattr(model, "quant_config", None)
    first = next(iter(modules.values()))
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "bits": first["bits"],
        "group_size": first["group_size"],
        "only": cfg.only if cfg is not None else None,
        "modules": modules,
    }


@register_extra_state
def _checkpoint_state(model: nn.Module) -> dict[str, Any]:
    """``{"quantization": record}`` in the ``state.json`` of a quantized model's checkpoint, else nothing."""
    record = quantization_record(model)
    return {} if record is None else {"quantization": record}


def prepare_quantized(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Replace the modules named in ``record`` by empty quantized ones, ready for ``load_state_dict``."""
    if record.get("format") != RECORD_FORMAT or record.get("version") != RECORD_VERSION:
        raise UserError(
            f"unknown quantization record {record.get('format')!r} version {record.get('version')!r}: "
            f"this moelab reads {RECORD_FORMAT!r} version {RECORD_VERSION}"
        )
    for path, spec in record["modules"].items():
        try:
            model.get_submodule(path)
        except AttributeError:
            raise UserError(f"the quantization record names {path!r}, which this model does not have") from None
        args = {k: v for k, v in spec.items() if k != "kind"}
        if spec["kind"] == "experts":
            new: nn.Module = QuantExperts(**args)
        elif spec["kind"] == "linear":
            new = QuantLinear(**args)
        else:
            raise UserError(f"unknown quantized module kind {spec['kind']!r} for {path!r}")
        set_module(model, path, new)
    if record.get("only"):
        model.quant_config = QuantConfig(record["bits"], record["group_size"], record["only"])  # type: ignore[assignment]
    return model

"""LoRA adapters on attention, dense-FFN and expert weights: fine-tune a large model by training a
low-rank update ``ΔW = (α / r) · B A`` beside each frozen weight (Hu et al., 2021).

The update runs as its own path beside the frozen weight (:class:`~moelab.nn.low_rank.LowRank`):
a ``nn.Linear`` gets it through a forward hook (``y = W x + (α / r) · B A x``), routed experts
through :class:`~moelab.moe.experts.Experts`' ``lora_up``/``lora_down``, which every dispatch form
(per-expert, loop, grouped, padded) adds. Why not fold ``ΔW`` into the weight each step: over a
bf16 base the sum rounds away every update below the weight's last bit, and the op using it would
keep a merged copy of every weight until backward (the model's size again). Merging happens once,
at the end (:func:`merge_lora`), in fp32: the merged model is a plain moelab model.

``B`` starts at zero, so an adapted model computes exactly what the base model computes until
the first update. The router is never adapted (a low-rank update of a ``[E, D]`` matrix saves
nothing); ``train_router=True`` leaves it trainable in full.

Targets: ``attention`` (every linear of self-, cross- and latent attention), ``mlp`` (dense FFNs
and shared experts), ``experts`` (routed experts' ``w_up``/``w_down``). Adapter names in state
dicts: ``….q_proj.lora.lora_A``, ``….experts.lora_up.lora_B``.

Memory: with ``train.lora.base_dtype=bf16`` the frozen base is 2 bytes a parameter; adapters stay
fp32 (what AdamW updates).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from moelab.config import LORA_TARGETS, ConfigError, LoRAConfig, ModelConfig
from moelab.errors import UserError
from moelab.model.cross_attention import CrossAttention
from moelab.model.materialize import DTYPES
from moelab.model.mla import MLAAttention
from moelab.model.transformer import Attention, Transformer
from moelab.moe.experts import Experts
from moelab.nn.ffn import DenseMLP
from moelab.nn.low_rank import LowRank

TARGETS = LORA_TARGETS
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
# names written by the first LoRA version (torch parametrizations), read by the loaders
_LEGACY = [
    (re.compile(r"\.parametrizations\.(weight|w_up|w_down)\.original$"), lambda m: f".{m.group(1)}"),
    (re.compile(r"\.parametrizations\.weight\.0\.(lora_[AB])$"), lambda m: f".lora.{m.group(1)}"),
    (re.compile(r"\.parametrizations\.(w_up|w_down)\.0\.(lora_[AB])$"), lambda m: f".lora_{m.group(1)[2:]}.{m.group(2)}"),
]


def legacy_name(name: str) -> str:
    """A state-dict name of the first LoRA version (``q_proj.parametrizations.weight.original``,
    ``…weight.0.lora_A``) under today's (``q_proj.weight``, ``q_proj.lora.lora_A``); others unchanged."""
    for pattern, repl in _LEGACY:
        name = pattern.sub(repl, name)
    return name


def base_dtype(cfg: LoRAConfig) -> torch.dtype:
    """The dtype a run holds its weights in: ``cfg.base_dtype`` with LoRA on (``auto``, left unresolved
    by ``train --init``, is fp32), fp32 otherwise (every weight trains and AdamW needs fp32 weights)."""
    if not cfg.enabled or cfg.base_dtype == "auto":
        return torch.float32
    return DTYPES[cfg.base_dtype]


def _adaptable(model: nn.Module, targets: tuple[str, ...]) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module name, module, weight name)`` of every weight the targets cover."""
    for name, module in model.named_modules():
        if "attention" in targets and isinstance(module, (Attention, MLAAttention, CrossAttention)):
            for child_name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    yield f"{name}.{child_name}", child, "weight"
        elif "mlp" in targets and isinstance(module, DenseMLP):
            for child_name, child in module.named_children():
                if isinstance(child, nn.Linear) and child_name in ("w_up", "w_down"):
                    yield f"{name}.{child_name}", child, "weight"
        elif "experts" in targets and isinstance(module, Experts):
            yield name, module, "w_up"
            yield name, module, "w_down"


def _add_low_rank(module: nn.Linear, args: tuple[Any, ...], out: Tensor) -> Tensor:
    """Forward hook of an adapted ``nn.Linear``: ``W x (+ b) + (α / r) · B A x``."""
    return out + module.lora(args[0])


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze ``model`` and add adapters in place; return the adapted weights' names.

    Only adapter parameters (and the routers with ``train_router``) keep ``requires_grad``.
    """
    if not cfg.enabled:
        raise ConfigError("train.lora.rank is 0 (LoRA off): set train.lora.rank >= 1 to add adapters")
    if is_lora(model):
        raise UserError("this model already has LoRA adapters: merge them (merge_lora) before adding new ones")
    for p in model.parameters():
        p.requires_grad_(False)
    sites = list(_adaptable(model, cfg.targets))
    if not sites:
        raise UserError(f"no weight of this model matches lora.targets={list(cfg.targets)}")
    names = []
    for module_name, module, param in sites:
        adapter = LowRank(getattr(module, param), cfg.rank, cfg.scale)
        if isinstance(module, Experts):
            setattr(module, f"lora_{param[2:]}", adapter)  # w_up → lora_up
        else:
            module.lora = adapter
            module._lora_hook = module.register_forward_hook(_add_low_rank)
        names.append(f"{module_name}.{param}")
    if cfg.train_router:
        for name, p in model.named_parameters():
            if _is_router(name):
                p.requires_grad_(True)
    model.lora_config = cfg  # type: ignore[attr-defined]
    return names


def _adapters(model: nn.Module) -> Iterator[tuple[nn.Module, str, str, LowRank]]:
    """``(module, adapter attribute, weight attribute, adapter)`` of every adapter in ``model``."""
    for module in model.modules():
        if isinstance(module, Experts):
            for side in ("up", "down"):
                adapter = getattr(module, f"lora_{side}")
                if adapter is not None:
                    yield module, f"lora_{side}", f"w_{side}", adapter
        elif isinstance(module, nn.Linear) and isinstance(getattr(module, "lora", None), LowRank):
            yield module, "lora", "weight", module.lora


def _is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def _is_router(name: str) -> bool:
    return ".router." in f".{name}"


def is_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LowRank) for m in model.modules())


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state without its adapters: the frozen base under the plain model's names."""
    return {name: value for name, value in model.state_dict().items() if not _is_adapter(name)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters (and a trained router) only: what a LoRA checkpoint needs beside its base."""
    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    keep = {}
    for name, p in model.named_parameters():
        if _is_adapter(name) or (cfg is not None and cfg.train_router and _is_router(name)):
            keep[name] = p.detach().contiguous()
    return keep


def save_lora(model: nn.Module, folder: str | Path, overwrite: bool = False) -> Path:
    """Write ``adapter.safetensors`` + ``adapter_config.json`` into ``folder`` (each atomically); an
    earlier adapter there is replaced only with ``overwrite``. Other files in the folder are left alone."""
    from safetensors.torch import save

    from moelab.outputs import atomic_write_bytes, atomic_write_text

    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    if cfg is None or not is_lora(model):
        raise UserError("this model has no LoRA adapters to save")
    out = Path(folder)
    existing = [n for n in (ADAPTER_FILE, ADAPTER_CONFIG) if (out / n).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds {existing[0]}: give another folder, or overwrite=True to replace it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / ADAPTER_FILE, save(lora_state_dict(model)))
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(asdict(cfg), indent=1))
    return out


def load_lora(model: nn.Module, folder: str | Path) -> nn.Module:
    """Add the adapters saved in ``folder`` to a base ``model`` (in place) and return it."""
    src = Path(folder)
    if not (src / ADAPTER_FILE).is_file() or not (src / ADAPTER_CONFIG).is_file():
        raise UserError(f"{src} has no LoRA adapter ({ADAPTER_FILE} + {ADAPTER_CONFIG})")
    data = json.loads((src / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    try:
        cfg = LoRAConfig(**data)
    except (TypeError, ConfigError) as exc:
        raise UserError(f"{src}/{ADAPTER_CONFIG} is not a LoRA config: {exc}") from None
    apply_lora(model, cfg)
    tensors = {legacy_name(k): v for k, v in load_file(str(src / ADAPTER_FILE)).items()}
    params = dict(model.named_parameters())
    expected = set(lora_state_dict(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise UserError(f"{src}/{ADAPTER_FILE} does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    wrong = [n for n, t in tensors.items() if t.shape != params[n].shape]
    if wrong:
        raise UserError(f"{src}/{ADAPTER_FILE}: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, "
                        f"the model needs {tuple(params[wrong[0]].shape)}")  # fmt: skip
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (``W ← W + ΔW``, summed in fp32, stored in W's dtype) and drop
    the adapters; all parameters trainable again. The result is a plain model: it saves, converts and
    exports like any other."""
    for module, attr, weight_name, adapter in list(_adapters(model)):
        weight = getattr(module, weight_name)
        weight.copy_((weight.float() + adapter.delta().float()).to(weight.dtype))
        delattr(module, attr)
        if attr == "lora":
            module._lora_hook.remove()
            del module._lora_hook
        else:
            setattr(module, attr, None)  # Experts without adapters
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_counts(model_cfg: ModelConfig, cfg: LoRAConfig) -> tuple[int, int]:
    """``(adapter parameters, trainable parameters)`` of ``model_cfg`` under ``cfg``, counted on the meta
    device (nothing allocated): for the training-memory check before a large model is loaded."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    base = sum(p.numel() for p in model.parameters())
    apply_lora(model, cfg)
    trainable, total = trainable_parameters(model)
    return total - base, trainable


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; the base weights count once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


__all__ = [
    "LoRAConfig",
    "LowRank",
    "apply_lora",
    "base_dtype",
    "base_state_dict",
    "is_lora",
    "legacy_name",
    "load_lora",
    "lora_counts",
    "lora_state_dict",
    "merge_lora",
    "save_lora",
    "trainable_parameters",
]

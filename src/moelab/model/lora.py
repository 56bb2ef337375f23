"""LoRA adapters on attention, dense-FFN and expert weights: fine-tune a large model by training a
low-rank update ``ΔW = (α / r) · B A`` beside each frozen weight (Hu et al., 2021).

Why parametrizations (``torch.nn.utils.parametrize``): the adapted weight is read through the
same attribute the modules already use (``linear.weight``, ``experts.w_up``), so every dispatch
backend, the fused SwiGLU and checkpointing see ``W + ΔW`` without a LoRA-aware copy of their
code; stacked expert weights ``[E, out, in]`` get one adapter per expert (``A: [E, r, in]``,
``B: [E, out, r]``) the same way a ``[out, in]`` matrix gets one. Merging is removing the
parametrization with its value kept: the merged model is a plain moelab model.

``B`` starts at zero, so an adapted model computes exactly what the base model computes until
the first update. The router is never adapted (a low-rank update of a ``[E, D]`` matrix saves
nothing); ``train_router=True`` leaves it trainable in full.

Targets: ``attention`` (every linear of self-, cross- and latent attention), ``mlp`` (dense FFNs
and shared experts), ``experts`` (routed experts' ``w_up``/``w_down``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from moelab.config import LORA_TARGETS, ConfigError, LoRAConfig
from moelab.errors import UserError
from moelab.model.cross_attention import CrossAttention
from moelab.model.mla import MLAAttention
from moelab.model.mlp import DenseMLP
from moelab.model.transformer import Attention
from moelab.moe.experts import Experts

TARGETS = LORA_TARGETS
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


class LowRankDelta(nn.Module):
    """``W ↦ W + scale · B @ A`` for a weight ``[..., out, in]`` (leading dims: one adapter each)."""

    def __init__(self, weight: Tensor, rank: int, scale: float) -> None:
        super().__init__()
        *lead, out_dim, in_dim = weight.shape
        rank = min(rank, out_dim, in_dim)
        self.scale = scale
        # A as nn.Linear's default init (Kaiming-uniform over fan_in = in); B zero: ΔW = 0 at the start
        bound = 1.0 / math.sqrt(in_dim)
        like = {"dtype": weight.dtype, "device": weight.device}  # meta when a checkpoint is streamed in
        self.lora_A = nn.Parameter(torch.empty(*lead, rank, in_dim, **like).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(*lead, out_dim, rank, **like))

    def delta(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta().to(weight.dtype)


def _adaptable(model: nn.Module, targets: tuple[str, ...]) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module name, module, parameter name)`` of every weight the targets cover."""
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
        parametrize.register_parametrization(module, param, LowRankDelta(getattr(module, param), cfg.rank, cfg.scale))
        names.append(f"{module_name}.{param}")
    if cfg.train_router:
        for name, p in model.named_parameters():
            if _is_router(name):
                p.requires_grad_(True)
    model.lora_config = cfg  # type: ignore[attr-defined]
    return names


def _is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def _is_router(name: str) -> bool:
    return ".router." in f".{name}"


def is_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LowRankDelta) for m in model.modules())


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state under its plain names (``q_proj.weight``, not
    ``q_proj.parametrizations.weight.original``), adapters left out: the tensors share storage with
    the frozen base weights, so copying into them loads a base model (``train --init``)."""
    out = {}
    for name, value in model.state_dict().items():
        if _is_adapter(name):
            continue
        out[name.replace(".parametrizations.", ".").replace(".original", "")] = value
    return out


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
    tensors = load_file(str(src / ADAPTER_FILE))
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
    """Fold every adapter into its weight (``W ← W + ΔW``) and drop the adapters; all parameters
    trainable again. The result is a plain model: it saves, converts and exports like any other."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for param in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, param, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; the base weights count once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


__all__ = [
    "LoRAConfig",
    "LowRankDelta",
    "apply_lora",
    "base_state_dict",
    "is_lora",
    "load_lora",
    "lora_state_dict",
    "merge_lora",
    "save_lora",
    "trainable_parameters",
]

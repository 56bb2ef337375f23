"""Find a model's weight matrices and swap modules by path: what quantization and decode packing share.

Why one place: both replace "the experts, and every linear layer except the routers" by another
module of the same interface. Routers stay in full precision everywhere (their math is fp32 by
design, and their decisions must not change); a second copy of that rule could drift.
"""

from __future__ import annotations

from torch import nn

from moelab.moe.experts import Experts


def is_router_path(path: str) -> bool:
    """``path`` (a ``named_modules`` name) is a router or inside one."""
    return ".router." in f".{path}."


def weight_modules(model: nn.Module, linears: bool = True) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every :class:`Experts` and, with ``linears``, every ``nn.Linear``
    outside routers, in ``named_modules`` order."""
    return [
        (path, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, Experts) or (linears and isinstance(mod, nn.Linear) and not is_router_path(path))
    ]


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at ``path`` (``"blocks.0.ffn.experts"``) by ``module``."""
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)

"""Where offloaded experts live: CPU memory (pinned with CUDA) or a memory-mapped safetensors file.

A store returns one expert's ``(w_up [m·F, D], w_down [D, F])`` in its own memory; the
:class:`moelab.infer.offload.LayerExpertCache` copies it to the compute device.

Legend: E experts, D model dim, F expert hidden, m up-projection multiplier.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from moelab.errors import UserError


class MemoryStore:
    """Expert weights in CPU memory: ``w_up [E, m·F, D]`` and ``w_down [E, D, F]`` per layer."""

    def __init__(self, weights: dict[int, tuple[Tensor, Tensor]], pin: bool = False) -> None:
        self.weights = {
            i: tuple(w.detach().to("cpu", copy=True).pin_memory() if pin else w.detach().to("cpu", copy=True) for w in pair)
            for i, pair in weights.items()
        }

    def load(self, layer: int, expert: int) -> tuple[Tensor, Tensor]:
        w_up, w_down = self.weights[layer]
        return w_up[expert], w_down[expert]


class SafetensorsStore:
    """Expert weights read from a (memory-mapped) safetensors file, one expert slice at a time.

    Tensor names follow moelab's state dict: ``blocks.{layer}.ffn.experts.w_up`` / ``w_down``.
    """

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        if not Path(path).is_file():
            raise UserError(f"expert file {str(path)!r} does not exist")
        self.path = str(path)
        self._file = safe_open(self.path, framework="pt", device="cpu")
        self._names = set(self._file.keys())

    def load(self, layer: int, expert: int) -> tuple[Tensor, Tensor]:
        names = (f"blocks.{layer}.ffn.experts.w_up", f"blocks.{layer}.ffn.experts.w_down")
        missing = [n for n in names if n not in self._names]
        if missing:
            raise UserError(f"{self.path} has no tensor {missing[0]!r}: is it a moelab MoE checkpoint?")
        return tuple(self._file.get_slice(n)[expert] for n in names)  # type: ignore[return-value]


def export_experts(model: nn.Module, path: str | Path) -> Path:
    """Write every MoE layer's expert weights to a safetensors file (the disk tier)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, block in enumerate(model.blocks):
        if block.is_moe:
            tensors[f"blocks.{i}.ffn.experts.w_up"] = block.ffn.experts.w_up.detach().cpu().contiguous()
            tensors[f"blocks.{i}.ffn.experts.w_down"] = block.ffn.experts.w_down.detach().cpu().contiguous()
    save_file(tensors, str(path))
    return Path(path)


__all__ = ["MemoryStore", "SafetensorsStore", "export_experts"]

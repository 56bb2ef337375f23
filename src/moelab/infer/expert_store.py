"""Where offloaded experts live: CPU memory (pinned with CUDA) or a memory-mapped safetensors file.

A store returns one expert's *payload*, the tensors its forward needs, in its own memory; the
:class:`moelab.infer.offload.LayerExpertCache` copies them to the compute device:
- full-precision experts: ``(w_up [m·F, D], w_down [D, F])``;
- weight-only quantized experts (:class:`moelab.quant.experts.QuantExperts`): ``(up qweight,
  up scales, down qweight, down scales)`` — int8 ``[N, K]`` with per-channel scales, int4
  nibbles with group-wise scales and zeros — so the bytes a tier moves are the quantized bytes.

Legend: E experts, D model dim, F expert hidden, m up-projection multiplier, N/K a projection's
output/input features.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from moelab.errors import UserError

Payload = tuple[Tensor, ...]


def expert_payloads(experts: nn.Module, device: torch.device | str = "cpu") -> list[Payload]:
    """Every expert's payload (module doc); int4 weights packed for ``device``'s kernel."""
    from moelab.quant.experts import QuantExperts

    if isinstance(experts, QuantExperts):
        dev = torch.device(device)
        return [(*experts.up[e].payload(dev), *experts.down[e].payload(dev)) for e in range(experts.num_experts)]
    return [(experts.w_up[e], experts.w_down[e]) for e in range(experts.num_experts)]


def payload_bytes(payload: Payload) -> int:
    return sum(t.numel() * t.element_size() for t in payload)


class MemoryStore:
    """Expert payloads in CPU memory, ready for the compute device (``needs_prepare`` False)."""

    needs_prepare = False

    def __init__(self, payloads: dict[int, list[Payload]], pin: bool = False) -> None:
        def keep(t: Tensor) -> Tensor:
            t = t.detach().to("cpu", copy=True)
            return t.pin_memory() if pin else t

        self.payloads = {layer: [tuple(keep(t) for t in p) for p in per] for layer, per in payloads.items()}

    def load(self, layer: int, expert: int) -> Payload:
        return self.payloads[layer][expert]


class SafetensorsStore:
    """Expert payloads read from a (memory-mapped) safetensors file, one expert slice at a time.

    Tensor names follow moelab's state dicts: ``blocks.{layer}.ffn.experts.w_up`` / ``w_down``
    (stacked), or, for a checkpoint written by ``moelab quantize``,
    ``blocks.{layer}.ffn.experts.up.{e}.qweight`` / ``.scales`` (int8) or ``.scales_zeros`` (int4).
    Quantized weights are stored in their plain form, so they are packed for the device's
    kernel after each fetch (``needs_prepare``).
    """

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        if not Path(path).is_file():
            raise UserError(f"expert file {str(path)!r} does not exist")
        self.path = str(path)
        self._file = safe_open(self.path, framework="pt", device="cpu")
        self._names = set(self._file.keys())
        self.needs_prepare = any(".ffn.experts.up." in n for n in self._names)

    def load(self, layer: int, expert: int) -> Payload:
        prefix = f"blocks.{layer}.ffn.experts"
        stacked = (f"{prefix}.w_up", f"{prefix}.w_down")
        if all(n in self._names for n in stacked):
            return tuple(self._file.get_slice(n)[expert] for n in stacked)
        names = []
        for proj in ("up", "down"):
            base = f"{prefix}.{proj}.{expert}"
            scales = f"{base}.scales" if f"{base}.scales" in self._names else f"{base}.scales_zeros"
            names += [f"{base}.qweight", scales]
        missing = [n for n in names if n not in self._names]
        if missing:
            raise UserError(f"{self.path} has no tensor {stacked[0]!r} or {missing[0]!r}: is it a moelab MoE checkpoint?")
        return tuple(self._file.get_tensor(n) for n in names)


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


__all__ = ["MemoryStore", "Payload", "SafetensorsStore", "expert_payloads", "export_experts", "payload_bytes"]

"""What to quantize and how: a small frozen config, validated like every moelab config.

Weight-only quantization keeps activations in floating point and stores weights as integers
with floating-point scales, so a batch-1 decode step moves 2–4× fewer bytes than bf16.

- ``bits=8``: symmetric, one scale per output channel (row of an ``[out, in]`` weight).
- ``bits=4``: asymmetric, one scale and one zero point per ``group_size`` consecutive inputs
  of each output channel (the layout PyTorch's int4 kernels take).
- ``only="experts"``: routed experts only (most of an MoE's bytes); ``"all"``: also attention
  projections, dense/shared feed-forward layers and the LM head. Routers and embeddings always
  stay in floating point (router math is fp32 by house rule; an embedding is a lookup).
"""

from __future__ import annotations

from dataclasses import dataclass

from moelab.config import ConfigError

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128, 256)
SCOPES = ("experts", "all")
RECORD_FORMAT = "moelab-weight-only"
RECORD_VERSION = 1


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 8
    group_size: int = 32  # int4 only: inputs sharing one scale and zero (int8 is per output channel)
    only: str = "experts"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"quant.bits={self.bits!r} is not supported; allowed: 8, 4")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(
                f"quant.group_size={self.group_size!r} is not supported by PyTorch's int4 kernels; "
                f"allowed: {', '.join(map(str, GROUP_SIZES))}"
            )
        if self.only not in SCOPES:
            raise ConfigError(f"quant.only={self.only!r} is not a scope; allowed: {', '.join(SCOPES)}")

    @property
    def k_multiple(self) -> int:
        """Inputs are padded to a multiple of this (see ``moelab.quant.kernels``)."""
        return 32 if self.bits == 8 else self.group_size

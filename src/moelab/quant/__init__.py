"""Weight-only quantization (int8 per output channel, int4 group-wise) with PyTorch's own kernels.

``quantize_model(model, bits, group_size, only)`` replaces experts (and optionally attention,
dense FFN and LM-head linears) in place; ``moelab quantize`` writes such a model as a checkpoint
that ``moelab.convert.load.load_model`` loads directly. See docs/quantization.md.
"""

from moelab.quant.experts import QuantExperts
from moelab.quant.linear import QuantLinear
from moelab.quant.model import (
    dequantize_model,
    prepack,
    prepare_quantized,
    quantization_record,
    quantize_model,
)
from moelab.quant.spec import QuantConfig

__all__ = [
    "QuantConfig",
    "QuantExperts",
    "QuantLinear",
    "dequantize_model",
    "prepack",
    "prepare_quantized",
    "quantization_record",
    "quantize_model",
]

"""CUDA counterparts (skipped without a GPU; never run during development: no GPU was available)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import UserError
from moelab.quant import QuantLinear
from quant.reference import reference_weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 128)])
def test_cuda_matmul_or_clear_error(bits, group):
    """bf16 on CUDA equals dequantize-then-F.linear; a missing kernel is a UserError, not a crash."""
    mod = QuantLinear.from_weight(torch.randn(48, 200), bits, group)
    ref_w = reference_weight(mod)
    x = torch.randn(3, 200)
    cpu_out = mod(x)  # packs for CPU first: the move below must repack
    mod = mod.to("cuda", torch.bfloat16)
    try:
        y = mod(x.to("cuda", torch.bfloat16))
    except UserError as exc:
        assert "kernel" in str(exc)
        return
    ref = F.linear(x, ref_w)
    torch.testing.assert_close(y.float().cpu(), ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)
    assert cpu_out.shape == y.shape
    state = mod.state_dict()
    back = QuantLinear(200, 48, bits, group)
    back.load_state_dict({k: v.cpu() for k, v in state.items()})
    torch.testing.assert_close(reference_weight(back), ref_w.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)

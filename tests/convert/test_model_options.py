"""Model options added for the Hugging Face families: defaults unchanged, bad combinations refused."""

from __future__ import annotations

import pytest
import torch

from moelab.config import ConfigError, MLAConfig
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_moe


def test_defaults_keep_the_foundation_parameter_names() -> None:
    names = {n for n, _ in Transformer(tiny_config(moe=tiny_moe())).named_parameters()}
    assert not any(
        n.endswith("bias") or "q_norm" in n or "pos_embed" in n or "shared.gate" in n for n in names
    )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: tiny_config(qk_norm="layer"), "model.qk_norm='layer'"),
        (lambda: tiny_config(positions="alibi"), "model.positions='alibi'"),
        (
            lambda: tiny_config(gelu_approx="tanh", activation="gelu", moe=tiny_moe()),
            "model.gelu_approx='tanh'",
        ),
        (lambda: tiny_moe(shared_gate=True), "moe.shared_gate=True"),
        (lambda: MLAConfig(qk_rope_head_dim=3), "model.mla.qk_rope_head_dim=3"),
        (lambda: tiny_config(mla=MLAConfig(), positions="learned"), "model.positions='learned'"),
    ],
)
def test_bad_option_combinations_name_the_field(build, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_learned_positions_refuse_positions_past_max_seq_len() -> None:
    model = Transformer(tiny_config(positions="learned", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_shared_gate_scales_the_shared_expert() -> None:
    model = Transformer(tiny_config(moe=tiny_moe(num_shared_experts=1, shared_gate=True))).eval()
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        before = model(ids).logits
        for layer in model.moe_layers:
            layer.shared.gate.weight.fill_(0.0)  # sigmoid(0) = 1/2
            layer.shared.w_down.weight.mul_(2.0)  # ... times 2 = the ungated shared expert
        ungated = Transformer(tiny_config(moe=tiny_moe(num_shared_experts=1))).eval()
        state = {k: v for k, v in model.state_dict().items() if "shared.gate" not in k}
        ungated.load_state_dict(
            {**state, **{k: v / 2 for k, v in state.items() if k.endswith("shared.w_down.weight")}}
        )
        assert torch.allclose(model(ids).logits, ungated(ids).logits, atol=1e-6)
        assert not torch.allclose(before, model(ids).logits)

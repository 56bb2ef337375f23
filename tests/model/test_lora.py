"""LoRA adapters: a fresh adapter changes nothing, training moves only the adapters and lowers the loss,
merged weights equal base + (α/r)·B·A, and adapters round-trip through their files."""

from __future__ import annotations

import pytest
import torch

from moelab.config import LORA_TARGETS, ConfigError, LoRAConfig, MoEConfig
from moelab.errors import UserError
from moelab.model.lora import TARGETS, apply_lora, load_lora, merge_lora, save_lora, trainable_parameters
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_mla, tiny_moe


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(moe=tiny_moe(num_shared_experts=1), **kw))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 33), generator=g)
    return ids[:, :-1], ids[:, 1:]


def test_fresh_adapters_compute_the_base_model_exactly() -> None:
    model = _model()
    x, _ = _batch()
    with torch.no_grad():
        before = model(x).logits
    names = apply_lora(model, LoRAConfig(rank=4, targets=("attention", "mlp", "experts")))
    assert any(n.endswith("experts.w_up") for n in names) and any("q_proj" in n for n in names)
    assert any("shared" in n for n in names)  # shared experts are dense MLPs
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_training_moves_only_adapters_and_lowers_the_loss() -> None:
    model = _model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total / 4
    x, y = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(x, labels=y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.2
    # the frozen weights did not move: the parametrization's originals equal the base
    for name, value in model.state_dict().items():
        plain = name.replace(".parametrizations.", ".").replace(".original", "")
        if "lora_" not in name:
            assert torch.equal(value, base[plain]), name


def test_merged_weights_equal_base_plus_scaled_product() -> None:
    """The paper's update written out: W' = W + (α / r) · B A, per expert for stacked weights."""
    model = _model()
    cfg = LoRAConfig(rank=3, alpha=6.0, targets=("attention", "experts"))
    apply_lora(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    experts = model.blocks[0].ffn.experts
    delta = experts.parametrizations.w_up[0]
    base_up = experts.parametrizations.w_up.original.detach().clone()
    A, B = delta.lora_A.detach().clone(), delta.lora_B.detach().clone()
    q = model.blocks[1].attn.q_proj
    base_q = q.parametrizations.weight.original.detach().clone()
    qA, qB = q.parametrizations.weight[0].lora_A.detach(), q.parametrizations.weight[0].lora_B.detach()
    x, _ = _batch()
    with torch.no_grad():
        adapted = model(x).logits
    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    expected_up = torch.stack([base_up[e] + (cfg.alpha / cfg.rank) * B[e] @ A[e] for e in range(base_up.shape[0])])
    torch.testing.assert_close(model.blocks[0].ffn.experts.w_up.detach(), expected_up, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.blocks[1].attn.q_proj.weight.detach(), base_q + 2.0 * qB @ qA, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(_model().state_dict())  # a plain model again
    assert all(p.requires_grad for p in model.parameters())


def test_adapters_round_trip_through_their_files(tmp_path) -> None:
    model = _model(mla=tiny_mla())
    apply_lora(model, LoRAConfig(rank=2, targets=("attention",), train_router=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    save_lora(model, tmp_path / "adapter")
    with pytest.raises(UserError, match="already holds"):
        save_lora(model, tmp_path / "adapter")
    x, _ = _batch()
    with torch.no_grad():
        expected = model(x).logits
    fresh = load_lora(_model(mla=tiny_mla()), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, expected)
    with pytest.raises(UserError, match="does not fit this model"):
        load_lora(_model(), tmp_path / "adapter")  # GQA attention: other projection names


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.lora\.rank"):
        LoRAConfig(rank=-1)
    with pytest.raises(ConfigError, match=r"train\.lora\.targets"):
        LoRAConfig(targets=("router",))
    with pytest.raises(ConfigError, match="LoRA off"):
        apply_lora(Transformer(tiny_config()), LoRAConfig())
    assert TARGETS == LORA_TARGETS
    dense = Transformer(tiny_config())
    with pytest.raises(UserError, match="no weight of this model matches"):
        apply_lora(dense, LoRAConfig(rank=2, targets=("experts",)))
    model = _model()
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2))
    assert isinstance(tiny_moe(), MoEConfig)

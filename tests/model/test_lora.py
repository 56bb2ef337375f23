"""LoRA adapters: a fresh adapter changes nothing, training moves only the adapters and lowers the loss,
merged weights equal base + (α/r)·B·A, and adapters round-trip through their files."""

from __future__ import annotations

import pytest
import torch

from moelab.config import LORA_TARGETS, ConfigError, LoRAConfig, MoEConfig
from moelab.errors import UserError
from moelab.model.lora import (
    TARGETS,
    apply_lora,
    legacy_name,
    load_lora,
    merge_lora,
    save_lora,
    trainable_parameters,
)
from moelab.model.transformer import Transformer
from moelab.moe.experts import Experts
from moelab.nn.low_rank import LowRank

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
    # the frozen weights did not move
    for name, value in model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base[name]), name


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
    base_up = experts.w_up.detach().clone()
    A, B = experts.lora_up.lora_A.detach().clone(), experts.lora_up.lora_B.detach().clone()
    q = model.blocks[1].attn.q_proj
    base_q = q.weight.detach().clone()
    qA, qB = q.lora.lora_A.detach(), q.lora.lora_B.detach()
    x, _ = _batch()
    with torch.no_grad():
        adapted = model(x).logits
    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    expected_up = torch.stack([base_up[e] + (cfg.alpha / cfg.rank) * B[e] @ A[e] for e in range(base_up.shape[0])])
    torch.testing.assert_close(model.blocks[0].ffn.experts.w_up.detach(), expected_up, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.blocks[1].attn.q_proj.weight.detach(), base_q + 2.0 * qB @ qA, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-4)  # fp32 sums in another order
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


def _adapted_experts(activation: str = "swiglu") -> Experts:
    torch.manual_seed(0)
    experts = Experts(num_experts=4, d_model=16, hidden=8, activation=activation)
    experts.lora_up = LowRank(experts.w_up, rank=3, scale=2.0)
    experts.lora_down = LowRank(experts.w_down, rank=3, scale=2.0)
    with torch.no_grad():
        for p in (experts.lora_up.lora_B, experts.lora_down.lora_B):
            p.normal_()
    return experts


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("rows", [[3, 0, 5, 1], [0, 0, 0, 1], [9, 0, 0, 0], [0, 0, 0, 0]])
def test_expert_adapters_agree_in_every_dispatch_form(activation: str, rows: list[int]) -> None:
    """Per-expert reference, loop, grouped_mm and padded forms add the same low-rank update, forward and
    backward, on awkward shapes (empty experts, one row, every row to one expert, no rows)."""
    experts = _adapted_experts(activation)
    x = torch.randn(sum(rows), 16, generator=torch.Generator().manual_seed(1))
    ref = torch.cat([experts.forward_expert(e, piece) for e, piece in enumerate(x.split(rows)) if piece.shape[0]] or
                    [x.new_zeros(0, 16)])  # fmt: skip
    outs = {"loop": experts(x, rows)}
    if experts.grouped_mm_supported(torch.float32, x.device):
        outs["grouped"] = experts.forward_grouped(x, torch.tensor(rows))
    cap = max(max(rows), 1)
    buf = torch.zeros(4, cap, 16)
    for e, piece in enumerate(x.split(rows)):
        buf[e, : piece.shape[0]] = piece
    padded = experts.forward_padded(buf)
    outs["padded"] = torch.cat([padded[e, :n] for e, n in enumerate(rows)])
    if not rows or sum(rows) == 0:
        assert all(out.shape == (0, 16) for out in outs.values())
        return
    g = torch.randn_like(ref)
    params = [experts.lora_up.lora_A, experts.lora_up.lora_B, experts.lora_down.lora_A, experts.lora_down.lora_B]
    want = torch.autograd.grad((ref * g).sum(), params, allow_unused=True, materialize_grads=True)
    for name, out in outs.items():
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=name)
        got = torch.autograd.grad((out * g).sum(), params, allow_unused=True, materialize_grads=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_an_update_below_a_bf16_weight_last_bit_still_reaches_the_output() -> None:
    """Why the update runs beside the weight: folded into a bf16 weight, a small ΔW rounds away entirely."""
    linear = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.fill_(0.0625)  # exact in bf16; its step there is 2⁻¹¹ ≈ 4.9e-4
    base_out = linear(torch.ones(1, 64, dtype=torch.bfloat16)).float()
    adapter = LowRank(linear.weight, rank=2, scale=1.0)
    with torch.no_grad():
        adapter.lora_B.fill_(1e-4)
        adapter.lora_A.fill_(1e-2)  # ΔW = 2e-6 per entry, far below half that step
    merged = (linear.weight + adapter.delta().to(torch.bfloat16)).detach()
    assert torch.equal(merged, linear.weight.detach())  # folded: lost
    x = torch.ones(1, 64)
    beside = (linear(x.to(torch.bfloat16)).float() + adapter(x)).detach()
    torch.testing.assert_close(beside - base_out, torch.full_like(beside, 64 * 2e-6 * 1), rtol=0.05, atol=0)


def test_names_of_the_first_lora_version_are_read() -> None:
    assert legacy_name("blocks.0.attn.q_proj.parametrizations.weight.original") == "blocks.0.attn.q_proj.weight"
    assert legacy_name("blocks.0.attn.q_proj.parametrizations.weight.0.lora_A") == "blocks.0.attn.q_proj.lora.lora_A"
    assert legacy_name("blocks.1.ffn.experts.parametrizations.w_up.original") == "blocks.1.ffn.experts.w_up"
    assert legacy_name("blocks.1.ffn.experts.parametrizations.w_down.0.lora_B") == "blocks.1.ffn.experts.lora_down.lora_B"
    assert legacy_name("blocks.1.ffn.experts.w_up") == "blocks.1.ffn.experts.w_up"

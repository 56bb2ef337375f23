"""Hugging Face import/export: logits and greedy tokens equal transformers' for every family."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from convert.hf_cases import FAMILY_CASES, V, greedy, tiny_hf_model
from moelab.config import ConfigError
from moelab.convert.hf import export_hf, import_hf, load_moelab, save_moelab
from moelab.errors import UserError


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_import_export_matches_transformers(family, tmp_path) -> None:
    theirs = tiny_hf_model(family)
    theirs.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = _logits(theirs, ids)
    assert torch.allclose(_logits(ours, ids), ref, atol=1e-4, rtol=0)
    prompt = ids[:1, :5]
    assert greedy(lambda x: _logits(ours, x), prompt) == greedy(lambda x: _logits(theirs, x), prompt)

    hf_type = json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"]
    export_hf(ours, tmp_path / "out", family=hf_type)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == type(theirs).__name__
    assert torch.allclose(_logits(reloaded, ids), ref, atol=1e-4, rtol=0)

    again = import_hf(tmp_path / "out")
    assert again.cfg == ours.cfg
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fused_expert_layout_and_shards_are_read(tmp_path) -> None:
    theirs = tiny_hf_model("mixtral")
    theirs.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, V, (1, 7))
    # transformers' in-memory names are the fused layout: experts.gate_up_proj [E, 2F, D], down_proj [E, D, F]
    fused = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    (tmp_path / "fused").mkdir()
    save_file(fused, tmp_path / "fused" / "model.safetensors")
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    assert torch.allclose(_logits(import_hf(tmp_path / "fused"), ids), _logits(theirs, ids), atol=1e-4)

    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.allclose(_logits(import_hf(tmp_path / "sharded"), ids), _logits(theirs, ids), atol=1e-4)


def test_moelab_folder_round_trip(tmp_path) -> None:
    theirs = tiny_hf_model("qwen3")  # tied embeddings
    theirs.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    save_moelab(ours, tmp_path / "ml")
    back = load_moelab(tmp_path / "ml")
    ids = torch.randint(0, V, (1, 6))
    assert back.cfg == ours.cfg and torch.equal(_logits(back, ids), _logits(ours, ids))


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_unsupported_configs_name_the_problem(tmp_path) -> None:
    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")
    _edit_config(tmp_path / "hf", model_type="falcon_h9")
    with pytest.raises(ConfigError, match="falcon_h9"):
        import_hf(tmp_path / "hf")
    _edit_config(
        tmp_path / "hf",
        model_type="llama",
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
    )
    with pytest.raises(ConfigError, match="rope_type='yarn'"):
        import_hf(tmp_path / "hf")
    _edit_config(
        tmp_path / "hf", rope_parameters={"rope_type": "default", "rope_theta": 1e4}, hidden_act="gelu"
    )
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        import_hf(tmp_path / "hf")
    _edit_config(tmp_path / "hf", hidden_act="silu", sliding_window=16, use_sliding_window=True)
    with pytest.raises(ConfigError, match="sliding_window=16"):
        import_hf(tmp_path / "hf")
    _edit_config(tmp_path / "hf", sliding_window=None, quantization_config={"quant_method": "fp8"})
    with pytest.raises(ConfigError, match="quantization_config='fp8'"):
        import_hf(tmp_path / "hf")


def test_missing_and_unexpected_tensors_are_listed(tmp_path) -> None:
    theirs = tiny_hf_model("olmoe")
    theirs.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    gone = "model.layers.1.self_attn.k_norm.weight"
    extra = {k: v for k, v in tensors.items() if k != gone}
    extra["model.layers.0.mlp.mystery.weight"] = torch.zeros(3)
    save_file(extra, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(UserError, match=r"missing.*k_norm"):
        import_hf(tmp_path / "hf")
    extra[gone] = tensors[gone]
    save_file(extra, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(UserError, match=r"unexpected.*mlp\.mystery\.weight"):
        import_hf(tmp_path / "hf")


def test_export_refuses_what_the_family_cannot_express(tmp_path) -> None:
    tiny_hf_model("gpt2").save_pretrained(tmp_path / "hf")
    gpt2 = import_hf(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"cannot export as mixtral: model\.moe"):
        export_hf(gpt2, tmp_path / "x", family="mixtral")
    with pytest.raises(ConfigError, match=r"cannot export as llama: model\.activation='gelu'"):
        export_hf(gpt2, tmp_path / "y", family="llama")


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {}),
        ("mixtral", {"moe": "topk"}),
        ("deepseek_v3", {"moe": "sigmoid_bias", "mla": True}),
        ("qwen3_moe", {"moe": "topk", "qk_norm": "head"}),
    ],
)
def test_native_moelab_models_export_to_transformers(family, overrides, tmp_path) -> None:
    """A model made in moelab (tied embeddings, default options) loads in transformers with the same logits."""
    from moelab.config import MLAConfig, RouterConfig
    from moelab.model.transformer import Transformer

    from helpers import tiny_config, tiny_moe

    kw = dict(overrides)
    if "moe" in kw:
        router = RouterConfig(
            name=kw.pop("moe"), renormalize=True, n_group=2 if family == "deepseek_v3" else 1
        )
        kw["moe"] = tiny_moe(router=router, aux_loss_coef=0.0)
    if kw.pop("mla", False):
        kw.update(
            mla=MLAConfig(kv_lora_rank=6, q_lora_rank=5, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6)
        )
        kw.update(n_kv_heads=4)
    model = Transformer(tiny_config(**kw)).eval()
    if family == "deepseek_v3":
        with torch.no_grad():
            for layer in model.moe_layers:
                layer.router.bias.normal_(0, 0.1)
    export_hf(model, tmp_path / "hf", family=family)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, 97, (2, 10))
    assert torch.allclose(_logits(theirs, ids), _logits(model, ids), atol=1e-4, rtol=0)


def test_base_model_checkpoints_without_prefix_are_read(tmp_path) -> None:
    """The hub's gpt2 weights are saved from GPT2Model: ``h.0.attn.c_attn.weight``, no ``transformer.``."""
    from safetensors.torch import load_file

    theirs = tiny_hf_model("gpt2")
    theirs.save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items() if not k.startswith("lm_head")}
    assert "h.0.attn.c_attn.weight" in bare
    save_file(bare, tmp_path / "hf" / "model.safetensors")
    ids = torch.randint(0, V, (1, 7))
    assert torch.allclose(_logits(import_hf(tmp_path / "hf"), ids), _logits(theirs, ids), atol=1e-4)

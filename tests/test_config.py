"""Config validation, presets, YAML/JSON round trips and dotted overrides."""

from __future__ import annotations

import pytest

from moelab.config import (
    ConfigError,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    apply_overrides,
    load_config,
    preset,
    preset_names,
    save_config,
)
from moelab.moe.validate import check_moe_config

from helpers import tiny_config, tiny_moe


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: MoEConfig(num_experts=4, top_k=5), r"moe\.top_k=5 is invalid: must be between 1 and moe\.num_experts=4"),
        (lambda: ModelConfig(d_model=30, n_heads=4), r"model\.d_model=30 is invalid: must be divisible by model\.n_heads=4"),
        (lambda: ModelConfig(n_heads=4, n_kv_heads=3), r"model\.n_kv_heads=3 is invalid: must divide model\.n_heads=4"),
        (lambda: MoEConfig(capacity_factor=0.0), r"moe\.capacity_factor=0\.0 is invalid: must be > 0"),
        (lambda: MoEConfig(capacity_factor=-1.0), r"moe\.capacity_factor=-1\.0 is invalid"),
        (lambda: check_moe_config(MoEConfig(router=RouterConfig(name="magic"))), r"moe\.router\.name='magic' is invalid: expected one of .*'topk'"),
        (lambda: check_moe_config(MoEConfig(dispatch="warp")), r"moe\.dispatch='warp' is invalid: expected one of .*'loop'"),
        (lambda: check_moe_config(MoEConfig(drop_policy="coin")), r"moe\.drop_policy='coin' is invalid: expected one of .*'position'"),
        (lambda: check_moe_config(MoEConfig(aux_loss="magic")), r"moe\.aux_loss='magic' is invalid: expected one of .*'load_balance'"),
        (lambda: MoEConfig(placement="some"), r"moe\.placement='some' is invalid: expected one of .*'every_n'"),
        (
            lambda: tiny_config(moe=tiny_moe(placement="explicit", layers=(0, 5))),
            r"moe\.layers=\[0, 5\] is invalid: layer indices must be in \[0, 1\].*bad: \[5\]",
        ),
        (lambda: MoEConfig(placement="explicit"), r"moe\.layers=\(\) is invalid: placement=explicit needs"),
        (lambda: ModelConfig(activation="tanh"), r"model\.activation='tanh' is invalid: expected one of 'geglu_tanh', 'gelu', 'relu', 'swiglu'"),
        (lambda: ModelConfig(attention="sideways"), r"model\.attention='sideways' is invalid"),
        (lambda: ModelConfig(vocab_size=0), r"model\.vocab_size=0 is invalid: must be a positive integer"),
        (lambda: check_moe_config(MoEConfig(router=RouterConfig(name="sigmoid_bias", n_group=2, topk_group=3))),
         r"moe\.router\.topk_group=3 is invalid: must be between 1 and"),
        (lambda: check_moe_config(MoEConfig(router=RouterConfig(noise_std=0.5))),
         r"moe\.router\.noise_std=0\.5 is invalid: router 'topk' has no option 'noise_std' \(its options: force_balanced"),
        (lambda: RouterConfig(temperature=[1, 2]), r"moe\.router\.temperature=\[1, 2\] is invalid: a router option is a number"),
        (lambda: ModelConfig(n_layers=2, layer_ffn_hidden=(4,)), r"model\.layer_ffn_hidden=\[4\] is invalid"),
        (lambda: preset("huge"), r"unknown preset 'huge': expected one of 'small', 'smoke', 'tiny'"),
    ],
)
def test_every_bad_value_gives_one_clear_message(build, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        build()


def test_presets_build() -> None:
    assert preset_names() == ["small", "smoke", "tiny"]
    for name in preset_names():
        cfg = preset(name)
        assert cfg.moe is not None and cfg.moe.num_experts >= 4


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_files(tmp_path, suffix: str) -> None:
    cfg = tiny_config(moe=tiny_moe(placement="explicit", layers=(1,), capacity_factor=1.25))
    path = tmp_path / f"cfg{suffix}"
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_dotted_overrides() -> None:
    cfg = apply_overrides(preset("smoke"), ["moe.num_experts=16", "moe.router.name=topk", "d_model=128", "moe.capacity_factor=1.5"])
    assert cfg.moe.num_experts == 16 and cfg.d_model == 128 and cfg.moe.capacity_factor == 1.5
    dense = apply_overrides(cfg, ["moe=null"])
    assert dense.moe is None
    back = apply_overrides(dense, ["moe.num_experts=2", "moe.top_k=1"])
    assert back.moe == MoEConfig(num_experts=2, top_k=1)
    assert apply_overrides(cfg, ["moe.layers=[0, 1]", "moe.placement=explicit"]).moe.layers == (0, 1)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("moe.bogus=1", r"unknown key 'moe\.bogus' in --set: moe has num_experts"),
        ("depth=3", r"unknown key 'depth' in --set: ModelConfig has vocab_size"),
        ("d_model", r"expected KEY=VALUE"),
        ("d_model.x=1", r"'d_model' is a value, not a section"),
        ("d_model=big", r"model\.d_model='big' is invalid: expected an integer"),
        ("moe.top_k=99", r"moe\.top_k=99 is invalid"),
    ],
)
def test_bad_overrides(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(preset("smoke"), [override])


def test_bad_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("d_model: 64\nwidth: 3\n")
    with pytest.raises(ConfigError, match=r"unknown field model\.width"):
        load_config(unknown)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"moe": {"num_experts": "eight"}}')
    with pytest.raises(ConfigError, match=r"moe\.num_experts='eight' is invalid: expected an integer"):
        load_config(wrong)


def test_layers_placement_and_moe_layer_list() -> None:
    assert tiny_config(n_layers=4, moe=tiny_moe(placement="every_n", every_n=2)).moe_layers == [1, 3]
    assert tiny_config(n_layers=4, moe=tiny_moe(placement="first_k_dense", first_k_dense=1)).moe_layers == [1, 2, 3]
    assert tiny_config(n_layers=4, moe=tiny_moe(placement="explicit", layers=(2,))).moe_layers == [2]
    assert tiny_config(n_layers=4).moe_layers == []


def test_overrides_may_carry_the_section_prefix() -> None:
    """Error messages spell model fields `model.d_model`; `--set` on a model config takes that too."""
    from moelab.config import run_preset

    cfg = apply_overrides(preset("smoke"), ["model.d_model=128", "model.moe.top_k=1"])
    assert cfg.d_model == 128 and cfg.moe.top_k == 1
    assert apply_overrides(MoEConfig(), ["moe.top_k=1"]).top_k == 1
    with pytest.raises(ConfigError, match=r"model\.d_model=65 is invalid: must be divisible by model\.n_heads"):
        apply_overrides(preset("smoke"), ["model.d_model=65"])
    assert apply_overrides(run_preset("smoke"), ["model.d_model=128"]).model.d_model == 128
    with pytest.raises(ConfigError, match=r"unknown key 'model\.depth'"):
        apply_overrides(preset("smoke"), ["model.depth=3"])


def test_config_files_that_hold_no_settings_get_one_line(tmp_path) -> None:
    from moelab.config import load_run_config

    cases = {
        "empty.json": ("", "holds no settings"),
        "blank.yaml": ("\n\n", "holds no settings"),
        "list.yaml": ("- 1\n- 2\n", "must hold a mapping of fields, got list"),
        "latin1.yaml": (b"name: caf\xe9\n", "is not UTF-8 text: byte 0xe9 at offset 9"),
        "bad.yaml": ("d_model: [1,\nn_layers: 2\n", "is not valid YAML"),
    }
    for name, (content, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        for load in (load_config, load_run_config):
            with pytest.raises(ConfigError, match=pattern) as exc:
                load(path)
            assert "\n" not in str(exc.value) and name in str(exc.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "defaults.json").write_text("{}")
    assert load_config(tmp_path / "defaults.json") == ModelConfig()

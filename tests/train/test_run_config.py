"""Run configs: presets reuse the model presets, overrides by section, YAML round trip, clear errors."""

from __future__ import annotations

import pytest

from moelab.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_run_config,
    normalize_run_overrides,
    preset,
    run_preset,
    save_config,
)


@pytest.mark.parametrize("name", ["smoke", "tiny", "small"])
def test_run_presets_reuse_model_presets(name: str) -> None:
    run = run_preset(name)
    assert run.model == preset(name) and run.name == name
    assert run.data.seq_len <= run.model.max_seq_len


def test_overrides_by_section_and_moe_shorthand() -> None:
    run = apply_overrides(
        run_preset("smoke"),
        normalize_run_overrides(["train.steps=7", "data.corpus=synthetic", "moe.top_k=1", "model.d_model=32"]),
    )
    assert (run.train.steps, run.data.corpus, run.model.moe.top_k, run.model.d_model) == (7, "synthetic", 1, 32)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.bogus=1", "unknown key 'train.bogus'"),
        ("data.seq_len=4096", "data.seq_len=4096 is invalid: must be <= model.max_seq_len"),
        ("train.precision=fp16", "train.precision='fp16' is invalid"),
        ("train.steps=0", "train.steps=0 is invalid"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 is invalid"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        apply_overrides(run_preset("smoke"), normalize_run_overrides([override]))


def test_yaml_round_trip_and_model_only_files(tmp_path) -> None:
    run = run_preset("tiny")
    save_config(run, tmp_path / "run.yaml")
    assert load_run_config(tmp_path / "run.yaml") == run
    save_config(preset("smoke"), tmp_path / "model.yaml")  # a model-only config is the model of a default run
    loaded = load_run_config(tmp_path / "model.yaml")
    assert loaded.model == preset("smoke") and loaded.train == RunConfig().train
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")


def test_exponent_floats_without_a_dot() -> None:
    run = apply_overrides(run_preset("smoke"), ["train.lr=3e-3", "train.eps=1e-6"])
    assert run.train.lr == 0.003 and run.train.eps == 1e-6
    with pytest.raises(ConfigError, match="expected a number"):
        apply_overrides(run_preset("smoke"), ["train.lr=fast"])

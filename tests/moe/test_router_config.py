"""Bad router options fail when a config is checked (a layer built, a run assembled) with a ConfigError naming the
field; `moelab routers` lists them."""

from __future__ import annotations

import pytest

from moelab.cli import main
from moelab.config import ConfigError, ModelConfig, MoEConfig, RouterConfig, apply_overrides, preset
from moelab.moe.routers import ROUTERS
from moelab.moe.routers.expert_choice import NonCausalRouterWarning
from moelab.moe.validate import check_model_config, check_moe_config
from router_cases import router_case


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(router=dict(name="expert_choice"), capacity_factor=0.0), "moe.capacity_factor"),
        (dict(router=dict(name="expert_choice"), capacity_factor=-1.0), "moe.capacity_factor"),
        (dict(router=dict(name="sigmoid_bias", n_group=4, topk_group=5)), "moe.router.topk_group"),
        (dict(router=dict(name="sigmoid_bias", n_group=3)), "moe.router.n_group"),
        (dict(router=dict(name="sigmoid_bias", n_group=4, topk_group=1), top_k=3), "moe.top_k"),
        (dict(top_k=9), "moe.top_k"),
        (dict(router=dict(name="switch"), top_k=2), "moe.top_k"),
        (dict(router=dict(name="topk"), aux_loss="load"), "moe.aux_loss"),
        (dict(router=dict(name="topk"), load_coef=0.1), "moe.load_coef"),
        (dict(router=dict(name="noisy_topk", noise_std=0.0), load_coef=0.1), "moe.router.noise_std"),
        (dict(router=dict(name="noisy_topk"), top_k=8, load_coef=0.1), "moe.top_k"),
        (dict(aux_loss="seq_aux", seq_aux_coef=0.1), "moe.seq_aux_coef"),
        (dict(importance_coef=-1.0), "moe.importance_coef"),
        (dict(health_collapse_share=0.0), "moe.health_collapse_share"),
        (dict(health_dead_steps=0), "moe.health_dead_steps"),
        (dict(router=dict(name="nope")), "moe.router.name"),
    ],
)
def test_bad_router_options_name_the_field(kwargs: dict, field: str) -> None:
    router = kwargs.pop("router", {})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_moe_config(MoEConfig(num_experts=8, top_k=kwargs.pop("top_k", 2), router=RouterConfig(**router), **kwargs))


def test_topk_group_above_n_group_via_overrides() -> None:
    with pytest.raises(ConfigError, match=r"moe\.router\.topk_group"):
        cfg = apply_overrides(preset("smoke"), ["moe.router.name=sigmoid_bias", "moe.router.n_group=2", "moe.router.topk_group=3"])
        check_model_config(cfg)


def test_expert_choice_warns_that_it_is_not_causal() -> None:
    with pytest.warns(NonCausalRouterWarning, match="not causal"):
        check_model_config(ModelConfig(moe=MoEConfig(router=RouterConfig(name="expert_choice"), capacity_factor=2.0)))
    assert not ROUTERS["expert_choice"].causal_safe


def test_every_router_builds_from_yaml_style_overrides() -> None:
    for name in ROUTERS:
        assert router_case(name).router.name == name


def test_routers_command_prints_one_line_per_router(capsys) -> None:
    assert main(["routers"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name, cls in ROUTERS.items():
        mine = [line for line in lines if line.strip().startswith(name + " ")]
        assert len(mine) == 1, name
        assert cls.__doc__.strip().splitlines()[0] in mine[0]
    assert "batch_priority" in out and "seq_aux" in out


def test_docs_table_has_one_row_per_router() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "routers.md").read_text(encoding="utf-8")
    for name in ROUTERS:
        assert sum(line.startswith(f"| `{name}` |") for line in doc.splitlines()) == 1, name


def test_docs_table_is_the_generated_one(capsys) -> None:
    """docs/routers.md holds exactly what `moelab routers --markdown` prints from the registry."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "routers.md").read_text(encoding="utf-8")
    assert main(["routers", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table.count("\n") == len(ROUTERS) + 2 and table in doc

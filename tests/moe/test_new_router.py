"""A router added from this file alone (one class, one registry line, its own options) runs everywhere a
built-in one does: config checks, the router contract, training and its checkpoint, `moelab routers`, the
generated docs table and fast decoding (through its forward, said in one line)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

from moelab.cli import main
from moelab.config import ConfigError, MoEConfig, RouterConfig, check_field
from moelab.moe.routers import ROUTERS
from moelab.moe.routers.base import Router, Selection
from moelab.moe.routers.options import RouterOptions
from moelab.moe.routers.table import router_table_markdown
from moelab.moe.validate import check_moe_config

NAME = "tempered_topk"


@dataclass(frozen=True)
class TemperedOptions(RouterOptions):
    temperature: float = 1.0  # logits divided by this before the softmax

    def __post_init__(self) -> None:
        check_field(self.temperature > 0, "moe.router.temperature", self.temperature, "must be > 0")


class TemperedTopKRouter(Router):
    """Softmax top-k over logits divided by a temperature (a test router)."""

    paper = "a test of moelab's router registry"
    formula = "p = softmax(x·W_g / τ); experts = TopK(p, K); w = p_kept / Σ p_kept"
    Options = TemperedOptions

    def select(self, x_TD, token_ids_T) -> Selection:  # its own math only: Router.forward does the rest
        logits_TE = self.logits(x_TD) / self.options.temperature
        scores_TE = logits_TE.softmax(dim=-1)
        expert_TK = self.top_k_experts(scores_TE)  # honours force_balanced, as every router must
        kept_TK = scores_TE.gather(1, expert_TK)
        return Selection(expert_TK, kept_TK / kept_TK.sum(dim=-1, keepdim=True), logits_TE, scores_TE)


@pytest.fixture
def registered():
    ROUTERS.register(NAME)(TemperedTopKRouter)
    yield TemperedTopKRouter
    ROUTERS.unregister(NAME)


def test_its_options_are_its_own(registered) -> None:
    cfg = check_moe_config(MoEConfig(router=RouterConfig(name=NAME, temperature=2.0)))
    assert dict(cfg.router.options) == {"temperature": 2.0, "force_balanced": False}
    with pytest.raises(ConfigError, match=r"moe\.router\.temperature=-1\.0 is invalid: must be > 0"):
        check_moe_config(MoEConfig(router=RouterConfig(name=NAME, temperature=-1.0)))
    with pytest.raises(ConfigError, match=r"router 'tempered_topk' has no option 'n_group' \(its options: force_balanced, temperature\)"):
        check_moe_config(MoEConfig(router=RouterConfig(name=NAME, n_group=4)))


@pytest.mark.parametrize("training", [True, False])
def test_it_keeps_the_router_contract(registered, training: bool) -> None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("router_contract", Path(__file__).with_name("test_router_contract.py"))
    contract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(contract)  # the same checks every built-in router passes
    contract.test_decision_invariants(NAME, training)
    contract.test_eval_mode_has_no_noise_and_same_seed_gives_same_decision(NAME)
    contract.test_gradients_reach_learned_router_weights(NAME)
    contract.test_force_balanced_or_ignored(NAME)
    contract.test_router_math_is_fp32_with_bf16_inputs(NAME)


def test_it_trains_saves_lists_documents_and_decodes(registered, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--set", "data.corpus=synthetic", "--set", "data.synthetic_docs=8",
                 "--set", "train.steps=6", "--set", "train.eval_every=6", "--set", "train.eval_batches=1",
                 "--set", f"moe.router.name={NAME}", "--set", "moe.router.temperature=2.0", "--no-progress",
                 "--out", str(out)]) == 0  # fmt: skip
    from moelab.checkpoint.folder import latest_checkpoint, read_run_config
    from moelab.convert.load import load_model

    saved = read_run_config(latest_checkpoint(out)).model.moe.router
    assert saved == RouterConfig(NAME, temperature=2.0, force_balanced=False)  # canonical: its options, resolved
    model, tok = load_model(out)
    assert all(type(b.ffn.router) is TemperedTopKRouter for b in model.blocks if b.is_moe)

    capsys.readouterr()
    assert main(["routers"]) == 0
    listing = capsys.readouterr().out
    assert "Softmax top-k over logits divided by a temperature" in listing and "temperature = 1.0" in listing
    assert f"| `{NAME}` | a test of moelab's router registry |" in router_table_markdown()

    from moelab.infer.fast_decode import ModuleRoutingNotice, fast_generate
    from moelab.infer.generate import SamplingParams, generate

    prompt = [tok.encode("def f(x):")]
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    ref = generate(model, prompt, params)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fast = fast_generate(model, prompt, params)
    assert fast[0].token_ids == ref[0].token_ids
    assert any(issubclass(w.category, ModuleRoutingNotice) and "TemperedTopKRouter" in str(w.message) for w in seen)
    assert torch.isfinite(model(torch.tensor([fast[0].token_ids])).logits).all()

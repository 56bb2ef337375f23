"""Studies: the catalog, and every implemented study at --budget smoke (verdicts: test_scoring.py)."""

from __future__ import annotations

import json

import pytest

from moelab.studies import CATALOG, SCORES, STUDIES
from moelab.studies.base import VERDICTS

from helpers import all_finite, study_cli


def test_catalog_has_thirteen_and_registered_are_in_it():
    assert len(CATALOG) == 13  # issue 11's twelve + issue 14's encoder-decoder study
    assert set(STUDIES) <= set(CATALOG)


def test_list_shows_every_study_and_unknown_is_one_line_error(tmp_path):
    r = study_cli("--list", cwd=tmp_path)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == len(CATALOG) == 13
    assert [line.split()[0] for line in lines] == list(CATALOG)
    assert len({line.index(CATALOG[line.split()[0]]) for line in lines}) == 1  # one aligned column
    r = study_cli("no-such-study", cwd=tmp_path)
    assert r.returncode == 2 and "unknown study" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = study_cli("placement", "--jobs", "0", cwd=tmp_path)
    assert r.returncode == 2 and "--jobs must be >= 1" in r.stderr and len(r.stderr.strip().splitlines()) == 1


EXPECTED_ARMS = {
    "capacity": {
        "cf0.5", "cf1", "cf1.25", "cf2", "cf0.5-score", "cf1-score", "cf1.25-score", "cf2-score", "dropless",
    },
    "routers": {
        "topk",
        "switch",
        "noisy_topk",
        "expert_choice",
        "sigmoid_bias",
        "sigmoid_aux",
        "sigmoid_bias_groups",
        "hash",
    },
    "placement": {"all", "every_other", "first_dense", "last_half"},
    "granularity": {"E8k2", "E32k8", "E32k8+shared"},
    "iso-flop": {"E4", "E8", "dense_4steps", "dense_8steps", "dense_16steps", "dense_32steps"},
    "sqrt-rule": {"dense_h64", "dense_h128", "dense_h256", "dense_h512", "dense_h1024", "E4", "E8", "E16"},
    "data-hunger": {f"{k}_{t}" for k in ("moe", "dense", "dense_total") for t in ("unique", "x4", "x16")},
    "swarm": {"moe", "dense_general", "swarm_classifier", "swarm_oracle", "swarm_logit_avg", "swarm_prob_avg"},
    "sparsity": {
        "dense", "moefied_k1", "moefied_k2", "moefied_k4", "moefied_ft_k1", "scratch_k1", "scratch_k1_same_steps",
        "scratch_k2_same_steps",
    },
}


def _iso_flop(d: dict, docs) -> None:
    """The budget ladder: every dense point a complete WSD schedule, one multiplier per MoE and seed, the
    verdict re-computable from the JSON alone."""
    from moelab.studies.base import rescore_study
    from moelab.studies.iso_flop import SMOKE_LADDER

    steps = d["numbers"]["moe_steps"]
    assert d["numbers"]["budgets"] == [round(m * steps) for m in SMOKE_LADDER]
    for seed, points in d["numbers"]["ladder"].items():
        assert [p["steps"] for p in points] == d["numbers"]["budgets"]
        assert [p["source"] for p in points] == ["branch"] * (len(points) - 1) + ["independent"]
        assert all(p["seed"] == int(seed) for p in points)
    # the dense rung at the MoE's budget spends the MoE's FLOPs less the router's
    assert d["arms"][f"dense_{steps}steps"]["mean"]["train_flops"] == pytest.approx(
        d["arms"]["E8"]["mean"]["train_flops"], rel=0.02
    )
    for b in d["numbers"]["budgets"]:  # every rung states its budget as a run's row does
        rung = d["arms"][f"dense_{b}steps"]["mean"]
        assert rung["steps"] == b and rung["tokens_per_active_param"] == rung["tokens"] / rung["params_active"]
    m = d["numbers"]["multiplier"]["E8"]
    assert len(m["per_seed"]) == 2 and len(m["fits"]) == 2
    assert d["verdict_reason"].startswith("dense needs ")
    again = rescore_study("iso-flop", docs=docs)
    assert (again.verdict, again.verdict_reason) == (d["verdict"], d["verdict_reason"])


def _sqrt_rule(d: dict, docs) -> None:
    assert len(d["numbers"]["fits_per_seed"]) == 2
    n = len(d["numbers"]["n_eq_points"]) + d["numbers"]["points_without_n_eq"]
    assert n == 3 * 2  # every (MoE, seed) is accounted for
    for e in ("E4", "E8", "E16"):
        p = d["numbers"]["params"][e]
        assert p["active"] < p["total"]


def _data_hunger(d: dict, docs) -> None:
    a = d["arms"]
    (total,) = d["further_claims"]  # the second claim: against the dense twin of equal total parameters
    assert total["verdict_detail"]["comparison"]["b"] == "dense_total_x16" and total["verdict"] in VERDICTS
    assert a["dense_total_x16"]["mean"]["params_total"] == pytest.approx(a["moe_x16"]["mean"]["params_total"], rel=0.05)
    # Same token budget; the repeated subsets are read 4 and 16 times (the measured epochs, not the fraction).
    assert a["moe_x16"]["mean"]["tokens"] == a["moe_unique"]["mean"]["tokens"]
    assert a["moe_x4"]["mean"]["epochs"] == pytest.approx(4, rel=0.05)
    assert a["moe_x16"]["mean"]["epochs"] == pytest.approx(16, rel=0.05)
    assert a["moe_unique"]["mean"]["epochs"] < 4
    assert len(d["numbers"]["curves"]["dense_x16"]) == 2


def _sparsity(d: dict, docs) -> None:
    a = d["arms"]
    # MoEfication with k = E sums every neuron group: it is the dense model again.
    assert a["moefied_k4"]["per_seed"]["val_loss"] == pytest.approx(a["dense"]["per_seed"]["val_loss"], abs=1e-4)
    # the fine-tuned MoEfied model starts from the MoEfied weights: training lowers its loss
    assert all(f < m for f, m in zip(a["moefied_ft_k1"]["per_seed"]["val_loss"], a["moefied_k1"]["per_seed"]["val_loss"]))
    for seed_points in d["numbers"]["sparsity"].values():
        assert len(seed_points) == 4
        assert all(0.0 <= f <= 1.0 for p in seed_points for f in p["layers"].values())


# Per-study checks of the smoke run beyond the shared ones (one smoke run per study in the suite).
STUDY_CHECKS = {"iso-flop": _iso_flop, "sqrt-rule": _sqrt_rule, "data-hunger": _data_hunger, "sparsity": _sparsity}


def test_shared_corpus_discovery(tmp_path):
    from moelab.studies.base import shared_corpus

    (tmp_path / "repo" / "src").mkdir(parents=True)
    (tmp_path / "repo" / "pyproject.toml").write_text("")
    assert shared_corpus(tmp_path / "repo" / "src" / "x.py") is None
    (tmp_path / "shared" / "corpus").mkdir(parents=True)
    assert shared_corpus(tmp_path / "repo" / "src" / "x.py") == tmp_path / "shared" / "corpus"


OWN_TESTS = {"enc-dec-specialisation", "specialisation", "gradient-conflict", "hybrid-inference"}  # studies whose arms are not val_loss arms: own test files


def test_every_registered_study_has_a_smoke_test():
    assert set(STUDIES) == set(EXPECTED_ARMS) | OWN_TESTS


@pytest.mark.parametrize("name", sorted(EXPECTED_ARMS))
def test_study_smoke(name, tmp_path):
    r = study_cli(
        name,
        "--budget",
        "smoke",
        "--seeds",
        "2",
        "--out",
        str(tmp_path / "runs"),
        "--docs",
        str(tmp_path / "docs"),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "docs" / f"{name}.json").read_text())
    assert d["verdict"] in VERDICTS and d["budget"] == "smoke" and d["seeds"] == [0, 1]
    assert set(d["arms"]) == EXPECTED_ARMS[name]
    assert d["arms"] and all_finite(d["arms"]) and all_finite(d["numbers"])
    for arm in d["arms"].values():
        assert len(arm["per_seed"]["val_loss"]) == 2
        assert 0 < arm["mean"]["val_loss"] < 20
    if name == "routers":  # the router metrics; expert choice is balanced by construction
        assert all({"load_cv", "dead_experts", "drop_rate", "tokens_per_s"} <= set(a["mean"]) for a in d["arms"].values())
        assert d["arms"]["expert_choice"]["mean"]["load_cv"] < 1e-9 < d["arms"]["topk"]["mean"]["load_cv"]
        assert all(a["mean"]["max_vio_global"] <= a["mean"]["max_vio_batch"] + 1e-9 for a in d["arms"].values())
        assert d["arms"]["expert_choice"]["mean"]["max_vio_batch"] < 1e-9  # balanced by construction
        (same_gate,) = d["further_claims"]  # sigmoid gate balanced by bias vs by the loss
        assert same_gate["verdict_detail"]["comparison"]["b"] == "sigmoid_aux"
    if name == "granularity":  # each arm at its best rate of the grid, chosen on a seed the verdict does not use
        tuning = d["numbers"]["lr_tuning"]
        assert tuning["seed"] not in d["seeds"] and set(tuning["grid"]) == EXPECTED_ARMS[name]
        for arm, row in tuning["grid"].items():
            assert len(row) == 3 and row[f"{tuning['lr'][arm]:g}"] == min(row.values())
        assert [c["verdict_detail"]["comparison"]["a"] for c in d["further_claims"]] == ["E32k8", "E32k8+shared"]
    assert d["plots"] and all((tmp_path / "docs" / p).is_file() for p in d["plots"])
    index = (tmp_path / "docs" / "README.md").read_text()
    assert f"[{name}]({name}.md)" in index
    page = (tmp_path / "docs" / f"{name}.md").read_text()
    assert "Verdict:" in page and d["verdict_reason"] in page
    if name in SCORES:  # the declared rule and every number behind the verdict
        assert "**Rule**" in page and d["rule"]["description"] and d["verdict_detail"]
    assert d["wall_s"] > 0 and d["threads"] >= 1  # how long it took, on how many threads
    assert f"Wall time {d['wall_s'] / 60:.1f} min" in (tmp_path / "docs" / f"{name}.md").read_text()
    if name in STUDY_CHECKS:
        STUDY_CHECKS[name](d, tmp_path / "docs")
    if name == "sparsity":  # the claim's arms at equal training FLOPs: the scratch MoE never gets more
        a = d["arms"]
        scratch, moefied = a["scratch_k1"]["mean"]["train_flops"], a["moefied_ft_k1"]["mean"]["train_flops"]
        assert moefied * 0.85 <= scratch <= moefied
        assert a["scratch_k1"]["mean"]["steps"] == d["numbers"]["equal_compute_steps"] > a["dense"]["mean"]["steps"]
    if name == "capacity":  # drops measured per arm: none without a capacity, some at factor 0.5
        arms = d["arms"]
        assert arms["dropless"]["mean"]["drop_rate"] == 0.0
        assert arms["cf0.5"]["mean"]["drop_rate"] > 0.2 and arms["cf0.5-score"]["mean"]["drop_rate"] > 0.2
        assert all(0.0 <= a["mean"]["drop_last_quarter"] <= 1.0 for a in arms.values())


def test_gpu_budget_is_twenty_times_the_full_tokens_on_cuda_and_refused_without_it(tmp_path, monkeypatch):
    import torch

    from moelab.studies.arms import base_run

    r = study_cli("routers", "--budget", "gpu", "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), cwd=tmp_path)
    if not torch.cuda.is_available():
        assert r.returncode != 0 and "--budget gpu trains on CUDA" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "runs").exists()  # refused before any folder or data work
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    full, gpu = base_run("full", 1000), base_run("gpu", 1000)
    tokens = lambda c: c.train.steps * c.train.batch_size  # noqa: E731
    assert tokens(gpu) == 20 * tokens(full) and gpu.train.device == "cuda" and gpu.train.precision == "bf16"
    assert gpu.model == full.model and gpu.train.warmup_steps == 10 * full.train.warmup_steps

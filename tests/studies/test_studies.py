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
        "sigmoid_bias_groups",
        "hash",
    },
    "placement": {"all", "every_other", "first_dense", "last_half"},
    "granularity": {"E8k2", "E8k2+shared", "E16k4", "E16k4+shared", "E32k8", "E32k8+shared"},
    "iso-flop": {"E4", "E8", "dense_4steps", "dense_8steps", "dense_16steps", "dense_32steps"},
    "sqrt-rule": {"dense_h64", "dense_h128", "dense_h256", "dense_h512", "dense_h1024", "E4", "E8", "E16"},
    "data-hunger": {f"{k}_{t}" for k in ("moe", "dense") for t in ("unique", "x4", "x16")},
    "swarm": {"moe", "dense_general", "swarm_classifier", "swarm_oracle", "swarm_logit_avg", "swarm_prob_avg"},
    "sparsity": {"dense", "moefied_k1", "moefied_k2", "moefied_k4", "scratch_k1", "scratch_k2"},
}


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
    assert d["plots"] and all((tmp_path / "docs" / p).is_file() for p in d["plots"])
    index = (tmp_path / "docs" / "README.md").read_text()
    assert f"[{name}]({name}.md)" in index
    page = (tmp_path / "docs" / f"{name}.md").read_text()
    assert "Verdict:" in page and d["verdict_reason"] in page
    if name in SCORES:  # the declared rule and every number behind the verdict
        assert "**Rule**" in page and d["rule"]["description"] and d["verdict_detail"]
    assert d["wall_s"] > 0 and d["threads"] >= 1  # how long it took, on how many threads
    assert f"Wall time {d['wall_s'] / 60:.1f} min" in (tmp_path / "docs" / f"{name}.md").read_text()
    if name == "capacity":  # drops measured per arm: none without a capacity, some at factor 0.5
        arms = d["arms"]
        assert arms["dropless"]["mean"]["drop_rate"] == 0.0
        assert arms["cf0.5"]["mean"]["drop_rate"] > 0.2 and arms["cf0.5-score"]["mean"]["drop_rate"] > 0.2
        assert all(0.0 <= a["mean"]["drop_last_quarter"] <= 1.0 for a in arms.values())

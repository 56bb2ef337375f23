"""Study ``swarm`` (issue 11): the request-level classifier, the equal-total expert count, and
the smoke run's equal budgets and costs."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import torch

from moelab.calc import arch_from_config, count
from moelab.config import run_preset
from moelab.data.loader import PackedData
from moelab.model.twins import dense_twin
from moelab.studies.base import run_study
from moelab.studies.swarm import NaiveBayesClassifier, block_domains, experts_for_total


def _packed(blocks: list[list[int]], domains: list[int], seq_len: int) -> PackedData:
    tokens = torch.tensor([t for b in blocks for t in b], dtype=torch.int32)
    dom = torch.tensor([d for d, b in zip(domains, blocks) for _ in b], dtype=torch.int32)
    return PackedData(tokens, {"domain": dom}, torch.zeros_like(tokens), {"domain": ["a", "b"]}, ["doc"], seq_len, 0)


def test_block_domain_is_the_majority_label():
    data = _packed([[1, 2, 3, 4], [5, 6, 7, 8]], [0, 1], seq_len=3)
    data.label_ids_N["domain"][0] = 1  # one token of block 0 labelled b: still a
    assert block_domains(data).tolist() == [0, 1]


def test_naive_bayes_matches_the_formula_written_out():
    # domain a: tokens 1,1,2 and 1,2,2 ; domain b: tokens 3,3,2 (V = 4, add-one smoothing)
    data = _packed([[1, 1, 2], [1, 2, 2], [3, 3, 2]], [0, 0, 1], seq_len=2)
    clf = NaiveBayesClassifier(data, torch.tensor([0, 0, 1]), [0, 1], vocab_size=4)
    p_a = [1 / 10, 4 / 10, 4 / 10, 1 / 10]  # counts 0,3,3,0 + 1 each over 6 + 4
    p_b = [1 / 7, 1 / 7, 2 / 7, 3 / 7]  # counts 0,0,1,2 + 1 each over 3 + 4
    x = [2, 3, 3]
    score_a = math.log(2 / 3) + sum(math.log(p_a[t]) for t in x)
    score_b = math.log(1 / 3) + sum(math.log(p_b[t]) for t in x)
    assert clf.predict(torch.tensor([x, [1, 1, 2]])) == [0 if score_a > score_b else 1, 0]
    assert torch.allclose(clf.log_probs_DV.exp(), torch.tensor([p_a, p_b], dtype=torch.float64))


def test_experts_for_total_is_the_closest_count():
    moe = replace(run_preset("tiny").model, vocab_size=512)
    target = 4 * count(arch_from_config(dense_twin(moe, "iso_active"))).total

    def total(e: int) -> int:
        return count(arch_from_config(replace(moe, moe=replace(moe.moe, num_experts=e)))).total

    e = experts_for_total(moe, target)
    assert abs(total(e) - target) <= min(abs(total(e - 1) - target), abs(total(e + 1) - target))


def test_swarm_smoke_has_equal_budgets_and_costs(tmp_path):
    run_study("swarm", "smoke", 2, out=tmp_path / "runs", docs=tmp_path / "docs")
    d = json.loads((tmp_path / "docs" / "swarm.json").read_text())
    n, arms = d["numbers"], d["arms"]
    D = len(n["domains"])
    assert D >= 2 and n["num_experts"] > 8
    tokens = n["training_tokens"]
    assert tokens["moe"] == tokens["dense_general"]
    if 4 % D == 0:  # the smoke batch (4) splits evenly: the swarm reads the same tokens
        assert tokens["swarm"] == tokens["moe"]
    spec = arms["swarm_classifier"]["mean"]
    for ensemble in ("swarm_logit_avg", "swarm_prob_avg"):
        assert arms[ensemble]["mean"]["fwd_flops_per_token"] == D * spec["fwd_flops_per_token"]
    assert spec["active_params"] == arms["dense_general"]["mean"]["active_params"]
    # equal total within one expert's size, equal active within the router
    assert abs(arms["moe"]["mean"]["total_params"] / spec["total_params"] - 1) < 0.15
    assert 0 < arms["moe"]["mean"]["active_params"] - spec["active_params"] < 0.05 * spec["active_params"]
    assert all(0.0 <= a <= 1.0 for a in n["classifier_accuracy"])
    assert "domain" in arms["moe"]["by_label"] and (tmp_path / "docs" / "swarm.png").is_file()
    # branch-train-merge: the specialists branch from one seed model trained on all data
    assert 0 < n["seed_steps"] < n["steps"] and n["specialist_lr"] < run_preset("smoke").train.lr
    spec_run = tmp_path / "runs" / "swarm" / f"specialist_{n['domains'][0]}" / "seed0"
    records = [json.loads(line) for line in (spec_run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "step" in r) == n["steps"] - n["seed_steps"]
    # the page's budget table: the swarm's steps run along one specialist's path, its tokens are all of them
    budget = n["budget_arms"]
    assert set(budget) == {"moe", "dense_general", "swarm"}
    assert budget["swarm"]["mean"]["steps"] == budget["moe"]["mean"]["steps"] == n["steps"]
    assert budget["swarm"]["per_seed"]["tokens"] == tokens["swarm"] and budget["moe"]["per_seed"]["tokens"] == tokens["moe"]
    assert budget["swarm"]["mean"]["params_total"] == D * budget["dense_general"]["mean"]["params_total"]


def test_branch_learning_rate_scales_with_the_square_root_of_the_batch():
    from moelab.studies.swarm import branch_lr

    assert branch_lr(3e-3, 16, 4) == 3e-3 * 0.5 and branch_lr(1e-3, 8, 8) == 1e-3

"""Studies' declared rules: the verdict the paired numbers imply, several arms under Holm, the page
that shows rule, sentence and paired differences, and ``--rescore`` rewriting a committed page
without training."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from moelab.errors import UserError
from moelab.stats import Rule, holm, paired_difference
from moelab.studies import SCORES, STUDIES, rescore_study
from moelab.studies.base import StudyResult, write_study
from moelab.studies.scoring import ArmClaim, combine

from helpers import study_cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "studies"
LOSS = Rule("val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05, paired=True)


def _arms(**values: list[float]) -> dict:
    return {name: {"per_seed": {"val_loss": xs}, "mean": {}, "std": {}} for name, xs in values.items()}


def test_paired_rule_sees_a_consistent_gap_the_pooled_spread_hides():
    # Seeds differ a lot (seed effect shared by both arms), the gap is the same in every seed.
    a, b = [5.0, 5.5, 6.0], [5.1, 5.61, 6.09]
    s = ArmClaim(LOSS, "a", ("b",)).score(_arms(a=a, b=b))
    assert s.verdict == "supported"
    c = s.detail["comparison"]
    assert c["paired"] and c["n_below"] == 3 and c["mean"] == pytest.approx(-0.1)
    assert "3/3 seeds lower" in s.reason and "[" in s.reason and "nats/token" in s.reason
    assert s.rule["better"] == "a" and s.rule["than"] == ["b"] and s.rule["min_effect"] == 0.01


def test_claim_verdicts_follow_the_decision_table():
    claim = ArmClaim(LOSS, "a", ("b",))
    assert claim.score(_arms(a=[6.1, 6.61, 7.09], b=[6.0, 6.5, 7.0])).verdict == "not supported"  # the other way
    assert claim.score(_arms(a=[6.0, 6.4, 7.1], b=[6.05, 6.38, 7.12])).verdict == "inconclusive"
    # significant but tiny: the whole interval inside ±0.01 -> not supported (smaller than the floor)
    assert claim.score(_arms(a=[6.0, 6.5, 7.0], b=[6.001, 6.5012, 7.0011])).verdict == "not supported"
    one = claim.score(_arms(a=[5.0], b=[6.0]))
    assert one.verdict == "inconclusive" and "no interval" in one.reason
    diverged = claim.score(_arms(a=[5.0, float("nan")], b=[6.0, 6.1]))
    assert diverged.verdict == "inconclusive" and "cannot score" in diverged.reason


def test_several_arms_are_one_claim_under_holm():
    arms = _arms(a=[5.0, 5.5, 6.0], b=[5.1, 5.61, 6.09], c=[5.02, 5.6, 5.95])
    claim = ArmClaim(LOSS, "a", ("b", "c"))
    s = claim.score(arms)
    ps = [paired_difference(arms["a"]["per_seed"]["val_loss"], arms[t]["per_seed"]["val_loss"]).p_t for t in "bc"]
    assert [v["p_adjusted"] for v in s.detail["comparisons"]] == pytest.approx(holm(ps))
    assert s.verdict == combine([v["verdict"] for v in s.detail["comparisons"]])
    assert "(Holm)" in s.reason and "(Holm)" in s.rule["description"]
    assert combine(["supported", "supported"]) == "supported"
    assert combine(["supported", "inconclusive"]) == "inconclusive"
    assert combine(["supported", "not supported"]) == "not supported"


def test_data_hunger_v1_numbers_are_supported_paired():
    """The issue's example, v1's per-seed gaps at x16 (160 steps): paired, the MoE's gap exceeds the dense's in
    all 3 seeds (+0.91 ± 0.26), which the unpaired rule had called inconclusive."""
    from moelab.studies.data_hunger import CLAIM

    gaps = {"moe_x16": [3.0505835229291955, 2.8124100700016417, 3.7088578933007623],
            "dense_x16": [1.8607430802378055, 2.141575135306668, 2.8490779643317765]}  # fmt: skip
    s = CLAIM.score({arm: {"per_seed": {"gap": g}} for arm, g in gaps.items()})
    c = s.detail["comparison"]
    assert s.verdict == "supported"
    assert c["mean"] == pytest.approx(0.907, abs=0.005) and c["sd"] == pytest.approx(0.26, abs=0.01)
    assert c["n_above"] == 3 and c["t_interval"]["low"] > 0.05  # above zero and above the floor


def test_every_study_declares_a_score_and_its_probes_pickle():
    from moelab.studies import (
        capacity,
        data_hunger,
        enc_dec_specialisation,
        gradient_conflict,
        routers,
        sparsity,
        specialisation,
    )

    assert set(STUDIES) - {"iso-flop"} <= set(SCORES)
    for mod in (capacity, routers, data_hunger, specialisation, gradient_conflict, enc_dec_specialisation, sparsity):
        assert isinstance(mod.CLAIM, ArmClaim)  # declared at module level, before anything runs
    probes = [capacity.drops_by_position, routers.router_metrics, data_hunger.gap_probe,
              specialisation.routing_specialisation, gradient_conflict.domain_cosines,
              enc_dec_specialisation.token_nmi_per_layer, sparsity.held_out_lm_loss]  # fmt: skip
    for probe in probes:  # module-level: they travel to --jobs worker processes
        assert pickle.loads(pickle.dumps(probe)) is probe


def test_page_shows_rule_sentence_and_paired_differences(tmp_path):
    arms = _arms(a=[5.0, 5.5, 6.0], b=[5.1, 5.61, 6.09], c=[5.2, 5.5, 6.3])
    for a in arms.values():
        a["mean"] = {"val_loss": sum(a["per_seed"]["val_loss"]) / 3}
        a["std"] = {"val_loss": 0.0}
    s = ArmClaim(LOSS, "a", ("b",)).score(arms)
    res = StudyResult.scored(s, name="x", claim="a beats b", method="m", budget="smoke", seeds=[0, 1, 2], data="d", arms=arms)
    write_study(res, tmp_path)
    page = (tmp_path / "x.md").read_text()
    assert "**Rule**" in page and s.rule["description"] in page
    assert f"**Verdict: supported** — {s.reason}" in page
    assert "| a − b | -0.1, -0.11, -0.09 |" in page  # the per-seed paired differences
    assert "| c − b |" in page and "for reading only" in page  # the other arm, descriptive
    d = json.loads((tmp_path / "x.json").read_text())
    assert d["verdict_detail"]["comparison"]["diffs"] == pytest.approx([-0.1, -0.11, -0.09])
    assert d["rule"]["metric"] == "val_loss"


def _committed_copy(tmp_path: Path, *names: str) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in names:
        shutil.copy(DOCS / f"{name}.json", docs)
        for plot in json.loads((DOCS / f"{name}.json").read_text())["plots"]:
            shutil.copy(DOCS / plot, docs)
    return docs


def _pre_rule_iso_flop(docs: Path) -> None:
    """An iso-flop page as written before declared rules (its numbers read a loss mid-schedule)."""
    old = StudyResult("iso-flop", "c", "m", "full", [0, 1, 2], "d", {}, "not supported", "multiplier 0.853 ± 0.043")
    docs.mkdir(exist_ok=True)
    (docs / "iso-flop.json").write_text(json.dumps({k: v for k, v in old.to_json().items() if k != "rule"}))


def test_rescore_rewrites_the_page_without_training(tmp_path, monkeypatch):
    import moelab.studies.arms as arms
    from moelab.train.trainer import Trainer

    def no_training(*args, **kwargs):
        raise AssertionError("--rescore must not train")

    monkeypatch.setattr(arms, "run_all", no_training)
    monkeypatch.setattr(Trainer, "train", no_training)
    docs = _committed_copy(tmp_path, "data-hunger")
    before = json.loads((docs / "data-hunger.json").read_text())
    res = rescore_study("data-hunger", docs, today="2030-01-02")
    after = json.loads((docs / "data-hunger.json").read_text())
    assert res.verdict == after["verdict"] == before["verdict"]  # the rule it ran under: nothing changes
    assert after["arms"] == before["arms"] and after["numbers"] == before["numbers"]  # numbers untouched
    assert after["wall_s"] == before["wall_s"] and after["command"] == before["command"]
    first = before.get("rescored") or {"previous_verdict": before["verdict"], "previous_reason": before["verdict_reason"]}
    assert after["rescored"] == {"date": "2030-01-02", "previous_verdict": first["previous_verdict"],
                                 "previous_reason": first["previous_reason"]}  # fmt: skip
    page = (docs / "data-hunger.md").read_text()
    assert "re-scored on 2030-01-02" in page and "1/3 seeds higher" in page and before["command"] in page
    assert "| [data-hunger](data-hunger.md) |" in (docs / "README.md").read_text()
    again = rescore_study("data-hunger", docs, today="2030-01-03")  # idempotent: the first verdict stays "before"
    assert again.rescored["previous_verdict"] == first["previous_verdict"]


def test_rescore_refuses_iso_flop_and_missing_pages(tmp_path):
    docs = tmp_path / "docs"
    _pre_rule_iso_flop(docs)
    with pytest.raises(UserError, match="middle of a 4x-longer"):
        rescore_study("iso-flop", docs)
    with pytest.raises(UserError, match="no committed result"):
        rescore_study("capacity", tmp_path)


def test_rescore_cli(tmp_path):
    docs = _committed_copy(tmp_path, "capacity")
    _pre_rule_iso_flop(docs)
    r = study_cli("capacity", "--rescore", "--docs", str(docs), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "capacity: supported -> supported: dropless − cf1 = " in r.stdout
    r = study_cli("iso-flop", "--rescore", "--docs", str(docs), cwd=tmp_path)
    assert r.returncode == 2 and "cannot be re-scored" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_threshold_claim_tests_a_quantity_against_a_number_fixed_before_the_run():
    from moelab.studies.scoring import ThresholdClaim

    rule = Rule("progress", lower_is_better=False, min_effect=0.05, alpha=0.05, paired=True, unit="")
    claim = ThresholdClaim(rule, "learned", 0.5, "half way")
    above = claim.score({"learned": {"per_seed": {"progress": [0.71, 0.74, 0.69]}}}, claim="learned early")
    assert above.verdict == "supported" and above.claim == "learned early"
    c = above.detail["comparison"]
    assert c["mean"] == pytest.approx(0.213333, abs=1e-5) and c["b"] == "half way"  # per-seed value − 0.5
    below = claim.score({"learned": {"per_seed": {"progress": [0.31, 0.34, 0.29]}}})
    assert below.verdict == "not supported"
    missing = claim.score({})
    assert missing.verdict == "inconclusive" and "cannot score" in missing.reason
    no_number = claim.score({"learned": {"per_seed": {"progress": [0.7, float("nan"), 0.6]}}})
    assert no_number.verdict == "inconclusive" and "cannot score" in no_number.reason
    assert claim.to_json()["than"] == ["half way"] and claim.to_json()["threshold"] == 0.5


def test_further_claims_get_their_own_verdict_on_the_page_and_in_the_index(tmp_path):
    from dataclasses import replace

    from moelab.studies.result import Scored
    from moelab.studies.scoring import ThresholdClaim

    arms = _arms(a=[5.0, 5.5, 6.0], b=[5.1, 5.61, 6.09])
    arms["a"]["per_seed"]["progress"] = [0.31, 0.34, 0.29]
    for name in ("steps", "tokens_per_active_param"):
        arms["a"]["mean"][name] = arms["b"]["mean"][name] = 100.0 if name == "steps" else 2.5
    rule = Rule("progress", lower_is_better=False, min_effect=0.05, alpha=0.05, paired=True, unit="")
    second = ThresholdClaim(rule, "a", 0.5).score(arms, claim="a gets half way")
    scored = replace(ArmClaim(LOSS, "a", ("b",)).score(arms), further=(second,))
    res = StudyResult.scored(scored, name="routers", claim="a beats b", method="m", budget="full", seeds=[0, 1, 2],
                             data="d", arms=arms)  # fmt: skip
    assert res.further_claims[0]["verdict"] == "not supported"
    write_study(res, tmp_path)
    page = (tmp_path / "routers.md").read_text()
    assert "**Claim 2.** a gets half way" in page and "**Verdict: not supported**" in page
    assert "Budget of each run:" in page
    index = (tmp_path / "README.md").read_text()
    row = next(line for line in index.splitlines() if line.startswith("| [routers](routers.md) |"))
    assert "| supported | a − b: -0.1 [" in row and "| 2.5 | 100 | 3 | full |" in row
    assert "[routers](routers.md) (claim 2) | a gets half way | a vs 0.5: higher progress by >= 0.05" in index
    assert "| not supported | a − 0.5: -0.187 [" in index
    again = StudyResult.from_json(json.loads((tmp_path / "routers.json").read_text()))
    assert again.further_claims == res.further_claims
    with pytest.raises(ValueError, match="further claim needs its sentence"):
        Scored("supported", "r", {}, {}, further=(Scored("supported", "r", {}, {}),))


def test_every_committed_page_has_the_verdict_its_study_scores_from_its_numbers():
    """The pages in docs/studies agree with the code: each study's score, applied to the page's stored
    per-seed numbers, gives the page's verdict and further claims' verdicts (a changed rule or a page
    edited by hand would not)."""
    for path in sorted(DOCS.glob("*.json")):
        res = StudyResult.from_json(json.loads(path.read_text()))
        scored = SCORES[res.name](res.arms, res.numbers)
        assert scored.verdict == res.verdict, res.name
        assert [f.verdict for f in scored.further] == [c["verdict"] for c in res.further_claims], res.name

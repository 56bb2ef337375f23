"""Studies built on moelab.analysis (issue 11): specialisation and gradient-conflict smoke runs through the CLI."""

from __future__ import annotations

import json
import math

import pytest

from moelab.studies.base import VERDICTS

from helpers import study_cli


def test_smoke_run_writes_nmi_per_label_drift_and_plot(tmp_path) -> None:
    docs = tmp_path / "docs"
    r = study_cli(
        "specialisation",
        "--budget",
        "smoke",
        "--seeds",
        "2",
        "--out",
        str(tmp_path / "runs"),
        "--docs",
        str(docs),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads((docs / "specialisation.json").read_text())
    assert d["verdict"] in VERDICTS and d["seeds"] == [0, 1]
    assert set(d["arms"]) == {"domain", "lang", "position", "token", "learned@25%"}
    for name in ("domain", "lang", "position", "token"):
        ps = d["arms"][name]["per_seed"]
        assert set(ps) == {"corrected_nmi", "nmi", "step0_corrected_nmi", "gain"}, name
        assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in ps.values()), name
        assert all(0.0 <= x <= 1.0 for x in ps["nmi"]), name
        # corrected = raw - shuffled baseline (mean over layers of per-layer values): never above the raw NMI
        assert all(c <= r + 1e-12 for c, r in zip(ps["corrected_nmi"], ps["nmi"])), name
        assert ps["gain"] == pytest.approx([c - c0 for c, c0 in zip(ps["corrected_nmi"], ps["step0_corrected_nmi"])])
    for seed in d["numbers"]["per_seed"]:
        steps, drift = seed["drift_steps"], seed["drift_mean"]
        assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 3
        assert drift[-1] == 1.0  # the final checkpoint is the final routing
        for lo, c, hi in zip(seed["ci_low"]["token"], seed["corrected"]["token"], seed["ci_high"]["token"]):
            assert lo <= c <= hi  # the interval contains its own estimate
    assert d["rule"]["metric"] == "corrected_nmi" and d["verdict_detail"]["comparison"]["a"] == "token"
    # claim 2, "learned early": progress at a quarter of training from the step-0 router's agreement to 1
    early = d["arms"]["learned@25%"]["per_seed"]
    assert early["progress"] == pytest.approx([(a - a0) / (1 - a0) for a, a0 in zip(early["agreement"], early["agreement_step0"])])
    (second,) = d["further_claims"]
    assert second["verdict"] in VERDICTS and second["rule"]["threshold"] == 0.5
    assert second["verdict_detail"]["comparison"]["a"] == "learned@25%"
    assert (docs / "specialisation.png").stat().st_size > 1000
    assert "Verdict:" in (docs / "specialisation.md").read_text()


def test_gradient_conflict_smoke(tmp_path) -> None:
    docs = tmp_path / "docs"
    r = study_cli(
        "gradient-conflict",
        "--budget",
        "smoke",
        "--seeds",
        "2",
        "--out",
        str(tmp_path / "runs"),
        "--docs",
        str(docs),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads((docs / "gradient-conflict.json").read_text())
    assert d["verdict"] in VERDICTS and set(d["arms"]) == {"dense FFN", "MoE experts", "MoE whole layer"}
    for arm in d["arms"].values():
        assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in arm["per_seed"]["cosine"])
        assert set(arm["per_seed"]) == {"cosine", "normalised_cosine", "ceiling", "pairs_without_ceiling"}
    assert d["rule"]["metric"] == "normalised_cosine"
    seed = d["numbers"]["per_seed"][0]
    assert len(seed["domains"]) >= 2 and len(seed["dense FFN"]) == len(seed["MoE experts"]) >= 1
    assert (docs / "gradient-conflict.png").stat().st_size > 1000

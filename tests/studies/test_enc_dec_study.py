"""Study ``enc-dec-specialisation`` (issue 14): smoke run through the CLI, and its NMI probe."""

from __future__ import annotations

import json
import math

import numpy as np

from moelab.analysis.specialization import nmi
from moelab.studies.base import VERDICTS

from helpers import study_cli


def test_smoke_run_writes_page_json_and_plot(tmp_path) -> None:
    docs = tmp_path / "docs"
    r = study_cli(
        "enc-dec-specialisation",
        "--budget",
        "smoke",
        "--seeds",
        "3",
        "--out",
        str(tmp_path / "runs"),
        "--docs",
        str(docs),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads((docs / "enc-dec-specialisation.json").read_text())
    assert d["verdict"] in VERDICTS and d["seeds"] == [0, 1, 2] and set(d["arms"]) == {"encoder", "decoder"}
    for arm in d["arms"].values():
        raw, corrected = arm["per_seed"]["token_nmi"], arm["per_seed"]["corrected_nmi"]
        assert len(raw) == 3 and all(0.0 <= v <= 1.0 and math.isfinite(v) for v in raw)
        assert all(math.isfinite(c) and c <= r + 1e-12 for c, r in zip(corrected, raw))  # baseline subtracted
        assert len(arm["per_seed"]["step0_corrected_nmi"]) == len(arm["per_seed"]["gain"]) == 3
    per_seed = d["numbers"]["per_seed"]
    assert len(per_seed) == 3
    for s in per_seed:
        assert len(s["corrected"]["encoder"]) == len(s["corrected"]["decoder"]) >= 1
        assert len(s["step0_corrected"]["encoder"]) == len(s["corrected"]["encoder"])
    assert d["rule"]["metric"] == "corrected_nmi"
    assert (
        d["plots"] == ["enc-dec-specialisation.png"]
        and (docs / "enc-dec-specialisation.png").stat().st_size > 1000
    )
    page = (docs / "enc-dec-specialisation.md").read_text()
    assert "Verdict:" in page and "moelab study enc-dec-specialisation --budget smoke --seeds 3" in page
    assert "[enc-dec-specialisation](enc-dec-specialisation.md)" in (docs / "README.md").read_text()


def test_nmi_separates_token_bound_from_token_blind_routing() -> None:
    """The probe's statistic: experts chosen by token id give NMI 1, experts chosen at random ≈ 0."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 8, 20_000)
    assert nmi(tokens % 8, tokens) > 0.99
    assert nmi(rng.integers(0, 8, 20_000), tokens) < 0.01

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
        values = arm["per_seed"]["token_nmi"]
        assert len(values) == 3 and all(0.0 <= v <= 1.0 and math.isfinite(v) for v in values)
    layers = d["numbers"]["token_nmi_per_layer"]
    assert len(layers) == 3 and all(len(s["encoder"]) == len(s["decoder"]) >= 1 for s in layers)
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

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


def test_equal_text_tokens_drops_specials_and_matches_counts_per_sequence() -> None:
    """Both stacks keep text tokens only, the same number in every sequence, drawn from that sequence."""
    from moelab.studies.enc_dec_specialisation import equal_text_tokens

    special = np.array([90, 91, 99])  # two sentinels and EOS
    enc_tok = np.array([1, 2, 90, 3, 4, 5, 99, 6, 7, 91, 8, 99])
    enc_row = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    dec_tok = np.array([99, 90, 10, 11, 91, 12, 99, 90, 13])  # row 0: 3 text tokens; row 1: 1
    dec_row = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    e, d = equal_text_tokens(enc_tok, enc_row, dec_tok, dec_row, special, seed=3)
    assert not np.isin(enc_tok[e], special).any() and not np.isin(dec_tok[d], special).any()
    for row in (0, 1):
        assert (enc_row[e] == row).sum() == (dec_row[d] == row).sum() == (3 if row == 0 else 1)
    assert dec_tok[d].tolist() == [10, 11, 12, 13]  # the decoder's text is all kept (it has fewer)
    assert set(enc_tok[e][enc_row[e] == 1]) <= {6, 7, 8} and list(e) == sorted(e)
    e2, _ = equal_text_tokens(enc_tok, enc_row, dec_tok, dec_row, special, seed=3)
    assert e2.tolist() == e.tolist()  # seeded: the same draw for the trained and the step-0 router

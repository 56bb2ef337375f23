"""Baseline-corrected NMI (moelab.analysis.corrected): the null respects the label's unit, independent
labels correct to ≈ 0, the interval is centred on its estimate and as wide as the sampling spread,
the adjusted value agrees with the exact adjusted mutual information, the step-0 gain is paired."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moelab.analysis.corrected import HalfSampler, corrected_nmi, label_unit, make_sample
from moelab.analysis.specialization import nmi

E = 8


def clustered_tokens(rng: np.random.Generator, n_docs: int = 60, per_doc: int = 40, width: int = 15, vocab: int = 1200):
    """Token ids clustered by document (each document draws from its own window of ``width`` ids) and
    routing that is mostly a lookup on the token (70% a fixed id → expert table): the token-id case."""
    table = np.random.default_rng(123).integers(0, E, vocab)
    doc = np.repeat(np.arange(n_docs), per_doc)
    token = rng.integers(0, vocab - width, n_docs)[doc] + rng.integers(0, width, doc.size)
    expert = np.where(rng.random(doc.size) < 0.7, table[token], rng.integers(0, E, doc.size))
    return expert, token, doc


def old_reflected_interval(x, y, doc, n_boot=40, seed=0):
    """What the analysis reported before: raw NMI with the basic (reflected) interval of a document
    bootstrap with replacement, written out here as it was."""
    rng = np.random.default_rng(seed)
    _, d = np.unique(doc, return_inverse=True)
    n = d.max() + 1
    value = nmi(x, y)
    boots = [nmi(x, y, weights_N=np.bincount(rng.integers(0, n, n), minlength=n).astype(float)[d]) for _ in range(n_boot)]
    return value, 2 * value - np.percentile(boots, 97.5), 2 * value - np.percentile(boots, 2.5)


def test_interval_contains_its_estimate_where_the_old_one_did_not():
    x, y, doc = clustered_tokens(np.random.default_rng(0))
    value, old_low, old_high = old_reflected_interval(x, y, doc)
    assert not old_low <= value <= old_high  # the bug of the issue: the estimate outside its own interval
    r = corrected_nmi(x, y, doc, n_shuffle=20, n_boot=40)
    assert r["unit"] == "token" and r["nmi"] == pytest.approx(value)
    assert r["corrected"] == pytest.approx(r["nmi"] - r["baseline_mean"])
    assert r["baseline_mean"] > 0.1  # many token ids: a large chance NMI, now subtracted
    assert r["ci_low"] < r["corrected"] < r["ci_high"]
    assert r["ci_high"] - r["corrected"] == pytest.approx(r["corrected"] - r["ci_low"])
    assert r["ci_high"] - r["ci_low"] == pytest.approx(2 * 1.959964 * r["boot_sd"], rel=1e-5)


def test_interval_width_matches_the_spread_across_independent_samples():
    """The replicates' sd estimates the corrected NMI's sampling sd (30 independent samples of the same
    process). Documents drawn with replacement overestimate it about 1.7× on this data."""
    estimates, sds = [], []
    for s in range(30):
        x, y, doc = clustered_tokens(np.random.default_rng(500 + s))
        r = corrected_nmi(x, y, doc, n_shuffle=10, n_boot=30, seed=s)
        estimates.append(r["corrected"])
        sds.append(r["boot_sd"])
    ratio = np.mean(sds) / np.std(estimates, ddof=1)
    assert 0.67 < ratio < 1.5, ratio


def test_independent_labels_correct_to_zero():
    rng = np.random.default_rng(1)
    n = 4000
    doc = np.repeat(np.arange(100), n // 100)
    expert = rng.integers(0, E, n)
    token = rng.integers(0, 500, n)  # many values: raw NMI far from 0
    r = corrected_nmi(expert, token, doc, n_shuffle=30, n_boot=20)
    assert r["nmi"] > 0.05
    assert abs(r["corrected"]) < 0.005 and abs(r["adjusted"]) < 0.01
    assert r["ci_low"] < 0 < r["ci_high"]


def test_document_labels_are_shuffled_between_documents():
    """Routing that clusters by document (each document prefers one expert) but ignores the domain: a
    token-level null calls it specialisation, the document-level null does not."""
    rng = np.random.default_rng(2)
    n_docs, per_doc = 40, 50
    doc = np.repeat(np.arange(n_docs), per_doc)
    domain = rng.integers(0, 4, n_docs)[doc]
    expert = np.where(rng.random(doc.size) < 0.8, rng.integers(0, E, n_docs)[doc], rng.integers(0, E, doc.size))
    assert label_unit(domain, doc) == "document" and label_unit(expert, doc) == "token"
    by_doc = corrected_nmi(expert, domain, doc, n_shuffle=40, n_boot=20)
    by_token = corrected_nmi(expert, domain, doc, n_shuffle=40, n_boot=20, unit="token")
    assert by_doc["unit"] == "document"
    # the wrong null: a chance level ten times below the NMI, "specialised"
    assert by_token["corrected"] > 0.05 and 10 * by_token["baseline_high"] < by_token["nmi"]
    # the right one: 40 documents give a chance NMI as large as the observed one
    assert by_doc["baseline_low"] <= by_doc["nmi"] <= by_doc["baseline_high"]
    assert by_doc["ci_low"] < 0 < by_doc["ci_high"] and by_doc["corrected"] < by_token["corrected"] - 0.05
    with pytest.raises(ValueError, match="constant inside every document"):
        corrected_nmi(domain, expert, doc, unit="document")
    # every draw of the document null keeps a label per document and the documents' label multiset
    sample = make_sample(domain, doc, "document")
    draw = sample.shuffled(np.random.default_rng(0))
    assert label_unit(draw, doc) == "document"
    assert sorted(draw[::per_doc].tolist()) == sorted(sample.y_N[::per_doc].tolist())


def test_half_samples_are_whole_distinct_documents():
    doc = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 4, 4, 5])
    label = np.array([7, 7, 8, 8, 8, 7, 9, 9, 8, 8, 8, 8, 7])
    sampler = HalfSampler(make_sample(label, doc, "document"))
    idx, rep = sampler.draw(np.random.default_rng(0))
    kept = np.unique(doc[idx])
    assert len(kept) == 3 and sampler.scale == 1.0
    assert sorted(idx.tolist()) == np.flatnonzero(np.isin(doc, kept)).tolist()  # all tokens of each, once
    assert rep.num_docs == 3 and rep.doc_D.tolist() == [rep.y_N[rep.doc_N == j][0] for j in range(3)]
    odd = HalfSampler(make_sample(label[:12], doc[:12], "document"))  # 5 documents: halves of 2
    assert odd.scale == pytest.approx(math.sqrt(2 / 3))


def exact_ami(x, y):
    """Adjusted mutual information (Vinh, Epps & Bailey 2010, arithmetic normalisation) with the exact
    expected MI under the hypergeometric (permutation) model, written out with log-factorials."""
    n = len(x)
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    a, b = np.bincount(xi), np.bincount(yi)
    joint = np.zeros((len(a), len(b)))
    np.add.at(joint, (xi, yi), 1)
    lf = lambda k: math.lgamma(k + 1)  # noqa: E731
    mi = sum(c / n * math.log(n * c / (a[i] * b[j])) for (i, j), c in np.ndenumerate(joint) if c > 0)
    emi = 0.0
    for ai in a:
        for bj in b:
            for nij in range(max(1, ai + bj - n), min(ai, bj) + 1):
                logp = lf(ai) + lf(bj) + lf(n - ai) + lf(n - bj) - lf(n) - lf(nij) - lf(ai - nij) - lf(bj - nij) - lf(n - ai - bj + nij)
                emi += nij / n * math.log(n * nij / (ai * bj)) * math.exp(logp)
    h = lambda c: -sum(p * math.log(p) for p in c / n if p > 0)  # noqa: E731
    return (mi - emi) / ((h(a) + h(b)) / 2 - emi)


def test_adjusted_matches_exact_adjusted_mutual_information():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, 80)
    y = np.where(rng.random(80) < 0.4, x, rng.integers(0, 6, 80))
    r = corrected_nmi(x, y, None, n_shuffle=4000, n_boot=0)
    assert r["ci_low"] == r["ci_high"] == r["corrected"] and r["boot_sd"] is None and r["n_boot"] == 0
    assert r["adjusted"] == pytest.approx(exact_ami(x, y), abs=0.01)


def test_step0_gain_is_paired():
    rng = np.random.default_rng(4)
    doc = np.repeat(np.arange(40), 30)
    domain = (np.arange(40) % 4)[doc]
    trained = np.where(rng.random(doc.size) < 0.6, domain, rng.integers(0, 4, doc.size))
    untrained = rng.integers(0, 4, doc.size)
    r = corrected_nmi(trained, domain, doc, n_shuffle=10, n_boot=20, initial_expert_N=untrained)
    s0 = r["step0"]
    assert set(s0) >= {"nmi", "corrected", "baseline_mean", "ci_low", "ci_high", "boot_sd"}
    assert s0["nmi"] == pytest.approx(nmi(untrained, domain))
    assert r["gain"] == pytest.approx(r["corrected"] - s0["corrected"])
    assert 0 < r["gain_ci_low"] < r["gain"] < r["gain_ci_high"]
    alone = corrected_nmi(trained, domain, doc, n_shuffle=10, n_boot=20)
    assert {k: alone[k] for k in ("nmi", "baseline_mean", "corrected")} == {k: r[k] for k in ("nmi", "baseline_mean", "corrected")}
    same = corrected_nmi(trained, domain, doc, n_shuffle=10, n_boot=20, initial_expert_N=trained)
    assert same["gain"] == same["gain_ci_low"] == same["gain_ci_high"] == 0.0  # same draws for both: no noise
    with pytest.raises(ValueError, match="not the same tokens"):
        corrected_nmi(trained, domain, doc, initial_expert_N=untrained[:-1])

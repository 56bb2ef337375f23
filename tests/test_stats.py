"""moelab.stats against scipy on fixed data, Holm written out by hand, the decision table one branch
per test, and the curve fits on curves whose answer is known."""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from moelab.stats import (
    VERDICTS,
    Interval,
    PowerLaw,
    Rule,
    bootstrap_difference_interval,
    bootstrap_interval,
    compute_multiplier,
    decide,
    decide_all,
    fit_power_law,
    holm,
    label_permutation_test,
    paired_difference,
    sign_flip_test,
    sign_test,
    t_interval,
    t_test,
    unpaired_difference,
    welch_interval,
)

# Fixed data: five seeds of two arms (MoE a little lower on four of them).
A = [3.112, 3.087, 3.141, 3.095, 3.120]
B = [3.140, 3.109, 3.160, 3.131, 3.118]
X = [0.31, -0.12, 0.45, 0.08, 0.27, 0.19, -0.05]


def _scipy_bootstrap(data, statistic, **kwargs):
    """scipy.stats.bootstrap with a fixed generator (``rng`` since scipy 1.15, ``random_state`` before)."""
    key = "rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state"
    return sps.bootstrap(data, statistic, **kwargs, **{key: np.random.default_rng(7)}).confidence_interval


def _close_interval(ours: Interval, low: float, high: float, rel: float = 1e-10) -> None:
    assert ours.low == pytest.approx(low, rel=rel)
    assert ours.high == pytest.approx(high, rel=rel)


# ------------------------------------------------------------------------------ against scipy


@pytest.mark.parametrize("level", [0.95, 0.9])
def test_t_interval_and_test_match_ttest_1samp(level):
    ref = sps.ttest_1samp(X, 0.0)
    ci = ref.confidence_interval(level)
    iv = t_interval(X, level)
    _close_interval(iv, ci.low, ci.high)
    assert (iv.level, iv.method) == (level, "t")
    assert t_test(X) == pytest.approx(ref.pvalue, rel=1e-10)


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_paired_difference_matches_ttest_rel(level):
    ref = sps.ttest_rel(A, B)
    ci = ref.confidence_interval(level)
    c = paired_difference(A, B, "moe", "dense", "val_loss", level=level)
    _close_interval(c.t_interval, ci.low, ci.high)
    assert c.p_t == pytest.approx(ref.pvalue, rel=1e-10)
    d = np.subtract(A, B)
    assert c.diffs == pytest.approx(tuple(d))
    assert c.mean == pytest.approx(d.mean()) and c.mean == pytest.approx(np.mean(A) - np.mean(B))
    assert c.sd == pytest.approx(np.std(d, ddof=1))
    assert (c.n, c.n_below, c.n_above, c.paired) == (5, 4, 1, True)
    assert (c.a, c.b, c.metric) == ("moe", "dense", "val_loss")


def test_unpaired_difference_matches_welch():
    a, b = [3.11, 3.09, 3.14, 3.10], [3.16, 3.12, 3.21, 3.13, 3.19, 3.15]
    ref = sps.ttest_ind(a, b, equal_var=False)
    c = unpaired_difference(a, b)
    if hasattr(ref, "confidence_interval"):  # scipy >= 1.11
        ci = ref.confidence_interval(0.95)
        _close_interval(c.t_interval, ci.low, ci.high)
        _close_interval(welch_interval(a, b, 0.95), ci.low, ci.high)
    assert c.t_interval.method == "welch"
    assert c.p_t == pytest.approx(ref.pvalue, rel=1e-10)
    assert c.mean == pytest.approx(np.mean(a) - np.mean(b))
    assert (c.n, c.paired, c.diffs) == (4, False, ())
    assert math.isnan(c.sd) and math.isnan(c.p_sign)


@pytest.mark.parametrize(
    "diffs", [[-1, -2, -3, -4, 0.5], [-1, -2, -3], [1, -1, 2, -2, 0, 0], [-0.1] * 9 + [0.2] * 2, [0.3]]
)
def test_sign_test_matches_binomtest(diffs):
    d = np.asarray(diffs, dtype=float)
    above, nonzero = int((d > 0).sum()), int((d != 0).sum())
    assert sign_test(d) == pytest.approx(sps.binomtest(above, nonzero, 0.5).pvalue, rel=1e-12)


def test_sign_test_edge_cases():
    assert sign_test([0.0, 0.0]) == 1.0
    assert math.isnan(sign_test([]))


def _mean_diff(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def test_sign_flip_test_is_exact_and_matches_permutation_test():
    d = np.subtract(A, B)
    one = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                               vectorized=True)
    two = sps.permutation_test((A, B), _mean_diff, permutation_type="samples", n_resamples=np.inf,
                               vectorized=True)
    assert sign_flip_test(d) == pytest.approx(one.pvalue, rel=1e-12)
    assert sign_flip_test(d) == pytest.approx(two.pvalue, rel=1e-12)
    # exact: 5 pairs all the same sign and size-ordered -> only the two extreme patterns reach it
    assert sign_flip_test([-1.0, -2.0, -3.0, -4.0, -5.0]) == pytest.approx(2 / 32)
    assert sign_flip_test(d, seed=0) == sign_flip_test(d, seed=123)  # exact ignores the seed


def test_sign_flip_test_random_for_many_pairs_is_close_to_exact():
    d = np.random.default_rng(5).normal(0.15, 1.0, size=18)
    signs = 1 - 2 * ((np.arange(2**18)[:, None] >> np.arange(18)) & 1)  # all 2**18 sign patterns
    exact = np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12)
    p = sign_flip_test(d, n_perm=20_000, seed=1)
    assert p == pytest.approx(exact, abs=0.015)
    assert p == sign_flip_test(d, n_perm=20_000, seed=1)  # deterministic for a seed


def test_label_permutation_test_matches_permutation_test_independent():
    a, b = [3.11, 3.09, 3.14, 3.10], [3.16, 3.12, 3.21, 3.13, 3.19]
    ref = sps.permutation_test((a, b), _mean_diff, permutation_type="independent", n_resamples=np.inf,
                               vectorized=True)
    assert label_permutation_test(a, b) == pytest.approx(ref.pvalue, rel=1e-12)
    assert unpaired_difference(a, b).p_permutation == pytest.approx(ref.pvalue, rel=1e-12)


def test_bootstrap_interval_agrees_with_scipy_and_is_deterministic():
    ref = _scipy_bootstrap((X,), np.mean, method="percentile", n_resamples=20_000, confidence_level=0.9)
    iv = bootstrap_interval(X, level=0.9, n_boot=20_000, seed=0)
    width = ref.high - ref.low
    assert iv.low == pytest.approx(ref.low, abs=0.03 * width)
    assert iv.high == pytest.approx(ref.high, abs=0.03 * width)
    assert iv.method == "bootstrap-percentile" and iv.contains(float(np.mean(X)))
    assert iv == bootstrap_interval(X, level=0.9, n_boot=20_000, seed=0)
    assert iv != bootstrap_interval(X, level=0.9, n_boot=20_000, seed=1)
    # paired comparisons bootstrap the differences (resampling whole pairs)
    assert paired_difference(A, B, level=0.9, seed=3).bootstrap_interval == bootstrap_interval(
        np.subtract(A, B), level=0.9, seed=3)


def test_bootstrap_difference_interval_agrees_with_scipy():
    a, b = [3.11, 3.09, 3.14, 3.10, 3.12], [3.16, 3.12, 3.21, 3.13, 3.19, 3.15]
    ref = _scipy_bootstrap((a, b), _mean_diff, method="percentile", n_resamples=20_000, vectorized=True)
    iv = bootstrap_difference_interval(a, b, n_boot=20_000)
    width = ref.high - ref.low
    assert iv.low == pytest.approx(ref.low, abs=0.03 * width)
    assert iv.high == pytest.approx(ref.high, abs=0.03 * width)


def test_too_few_values_give_undefined_intervals_not_errors():
    assert not t_interval([1.0]).defined and not bootstrap_interval([1.0]).defined
    assert math.isnan(t_test([1.0]))
    c = paired_difference([1.0], [1.2])
    assert c.n == 1 and math.isnan(c.sd) and math.isnan(c.p_t) and not c.t_interval.contains(-0.2)
    assert c.mean == pytest.approx(-0.2)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        paired_difference([1.0, math.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="level"):
        t_interval([1.0, 2.0], level=1.0)
    with pytest.raises(ValueError, match="alpha"):
        Rule(alpha=0.0)
    with pytest.raises(ValueError, match="min_effect"):
        Rule(min_effect=-0.1)


# -------------------------------------------------------------------------------------- Holm


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])  # 0.3*2, max(0.6, 0.6*1)
    assert holm([0.5, 0.9, 0.2]) == pytest.approx([1.0, 1.0, 0.6])  # capped at 1
    assert holm([0.02]) == [0.02]


def test_holm_is_monotone_capped_and_skips_nan():
    p = np.random.default_rng(0).uniform(0, 0.3, size=12)
    adj = np.array(holm(p))
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0) and np.all(adj <= 1) and np.all(adj >= p)
    out = holm([0.01, math.nan, 0.04])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)


# --------------------------------------------------------------------- the decision table


RULE = Rule(metric="val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05)
BASE = [3.10, 3.20, 3.05, 3.15, 3.12]


def _arm(diffs):
    return [b + d for b, d in zip(BASE, diffs)]


def test_rule_describe_and_json():
    assert RULE.describe() == "lower val_loss by >= 0.01 nats/token, paired t, alpha 0.05 (Holm)"
    assert Rule(lower_is_better=False, paired=False, metric="acc", unit="").describe() == (
        "higher acc, Welch t, alpha 0.05 (Holm)")
    assert RULE.to_json()["min_effect"] == 0.01 and "description" in RULE.to_json()


def test_decide_fewer_than_two_seeds_is_inconclusive():
    v = decide(RULE, [3.0], [3.5], "moe", "dense")
    assert v.verdict == "inconclusive" and "fewer than 2 seeds" in v.reason
    assert "no interval with 1 seed" in v.sentence


def test_decide_supported():
    diffs = [-0.031, -0.029, -0.033, -0.030, -0.032]
    v = decide(RULE, _arm(diffs), BASE, "moe", "dense_iso_active")
    assert v.verdict == "supported"
    assert v.p_adjusted == pytest.approx(sps.ttest_rel(_arm(diffs), BASE).pvalue)
    assert v.comparison.t_interval.level == pytest.approx(0.95)  # 1 - alpha
    s = v.sentence
    assert s.startswith("moe − dense_iso_active = −0.03") and "nats/token" in s
    assert "5/5 seeds lower" in s and "p < 0.001" in s and s.endswith(": supported")
    lo, hi = v.comparison.t_interval.low, v.comparison.t_interval.high
    assert f"[{lo:.4f}, {hi:.4f}]".replace("-", "−") in s


def test_decide_significant_the_other_way_is_not_supported():
    v = decide(RULE, _arm([0.030, 0.028, 0.035, 0.031, 0.026]), BASE, "moe", "dense")
    assert v.verdict == "not supported" and "other way" in v.reason
    assert "0/5 seeds lower" in v.sentence


def test_decide_interval_inside_floor_is_not_supported():
    rule = Rule(min_effect=0.05)
    v = decide(rule, _arm([0.001, -0.001, 0.0005, -0.0005, 0.0002]), BASE)
    assert v.verdict == "not supported" and "smaller than the floor" in v.reason
    assert v.p_adjusted > rule.alpha


def test_decide_not_significant_is_inconclusive():
    v = decide(Rule(), _arm([-0.05, 0.04, -0.03, 0.02, -0.01]), BASE)
    assert v.verdict == "inconclusive" and "not significant" in v.reason


def test_decide_significant_but_below_floor_and_interval_beyond_it_is_inconclusive():
    v = decide(RULE, _arm([-0.008, -0.012, -0.0095, -0.0105, -0.0093]), BASE)
    c = v.comparison
    assert v.p_adjusted < RULE.alpha and abs(c.mean) < RULE.min_effect and c.t_interval.low < -0.01
    assert v.verdict == "inconclusive" and "below the floor" in v.reason


def test_decide_higher_is_better_and_unpaired_rule():
    rule = Rule(metric="accuracy", lower_is_better=False, unit="", paired=False)
    v = decide(rule, [0.61, 0.63, 0.62, 0.64], [0.50, 0.52, 0.51, 0.49], "moe", "dense")
    assert v.verdict == "supported" and not v.comparison.paired
    assert "unpaired, 4 vs 4 seeds" in v.sentence


def test_decide_given_adjusted_p_decides():
    diffs = [-0.031, -0.029, -0.033, -0.030, -0.032]
    v = decide(RULE, _arm(diffs), BASE, p_adjusted=0.2)
    assert v.verdict == "inconclusive" and v.p_adjusted == 0.2 and "(Holm)" in v.sentence


def test_decide_all_applies_holm_over_the_claim():
    rule = Rule()
    moe = _arm([-0.02, -0.05, 0.0, -0.04, -0.03])
    twin2 = _arm([-0.03, -0.031, -0.029, -0.032, -0.030])  # moe - twin2: no consistent gap
    pairs = [("moe", "dense_a", moe, BASE), ("moe", "dense_b", moe, twin2)]
    verdicts = decide_all(rule, pairs)
    raw = [sps.ttest_rel(moe, BASE).pvalue, sps.ttest_rel(moe, twin2).pvalue]
    assert [v.p_adjusted for v in verdicts] == pytest.approx(holm(raw))
    assert raw[0] < 0.05 <= verdicts[0].p_adjusted  # significant alone, not after Holm
    assert verdicts[0].verdict == "inconclusive" and decide(rule, moe, BASE).verdict == "supported"
    assert all(v.verdict in VERDICTS for v in verdicts)


def test_verdict_and_comparison_json_are_strict_json():
    v = decide(RULE, [3.0], [3.5])  # NaN fields must become None
    blob = json.dumps(v.to_json(), allow_nan=False)
    back = json.loads(blob)
    assert back["comparison"]["sd"] is None and back["comparison"]["t_interval"]["low"] is None
    assert back["rule"]["metric"] == "val_loss" and back["verdict"] == "inconclusive"
    c = json.loads(json.dumps(paired_difference(A, B).to_json(), allow_nan=False))
    assert c["diffs"] == pytest.approx(list(np.subtract(A, B))) and c["n_below"] == 4


# ------------------------------------------------------------------------------ curve fits


FLOPS = np.logspace(15, 18, 7)


@pytest.mark.parametrize("a,b,c", [(2.0, 0.3, 1.5), (0.8, 0.08, 2.9), (5.0, 0.6, 0.4)])
def test_power_law_recovers_known_parameters(a, b, c):
    y = a * (FLOPS / FLOPS[0]) ** (-b) + c
    fit = fit_power_law(FLOPS, y)
    assert (fit.a, fit.b, fit.c) == pytest.approx((a, b, c), rel=1e-5)
    assert fit.x0 == FLOPS[0] and fit.rmse < 1e-7
    assert fit_power_law(FLOPS[::-1], y[::-1]) == fit  # order does not matter


def test_power_law_without_floor_and_with_three_points():
    y = 3.0 * (FLOPS / FLOPS[0]) ** -0.2
    fit = fit_power_law(FLOPS, y, floor=False)
    assert fit.c == 0.0 and (fit.a, fit.b) == pytest.approx((3.0, 0.2), rel=1e-5)
    three = fit_power_law(FLOPS[:3], 2.0 * (FLOPS[:3] / FLOPS[0]) ** -0.3 + 1.5)
    assert three.c == 0.0  # 3 points cannot pin a floor too


def test_power_law_floor_stays_below_the_measured_losses():
    y = 2.0 * (FLOPS / FLOPS[0]) ** -0.3 + 1.5
    y[-1] -= 0.2  # a last point that would pull the floor above itself
    fit = fit_power_law(FLOPS, y)
    assert 0.0 <= fit.c < y.min() and fit.b > 0 and fit.a >= 0


def test_power_law_inverse():
    law = PowerLaw(a=2.0, b=0.3, c=1.5, x0=1e15)
    for x in (1e15, 3.7e16, 2e18):
        assert law.inverse(law(x)) == pytest.approx(x, rel=1e-10)
    assert law.inverse(1.5) is None and law.inverse(1.2) is None
    assert json.loads(json.dumps(law.to_json()))["b"] == 0.3


def test_power_law_bad_input():
    with pytest.raises(ValueError, match="3 distinct"):
        fit_power_law([1.0, 1.0, 2.0], [3.0, 3.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1.0, 2.0, 3.0], [3.0, -1.0, 2.0])
    with pytest.raises(ValueError, match="same length"):
        fit_power_law([1.0, 2.0, 3.0], [3.0, 2.0])


def _moe_curve(x):
    return 2.0 * (x / 1e15) ** -0.3 + 1.5


def test_compute_multiplier_on_known_curves():
    # seed s: dense at k_s times the FLOPs reaches the MoE's loss, so the multiplier is k_s
    ks = (2.0, 3.0, 4.0)
    ladders = [list(FLOPS)] * 3
    dense_loss = [[_moe_curve(x / k) for x in FLOPS] for k in ks]
    m = compute_multiplier(ladders, dense_loss, [1e16] * 3, [_moe_curve(1e16)] * 3, seed=0)
    assert m.per_seed == pytest.approx(ks, rel=1e-5)
    assert m.geometric_mean == pytest.approx(24 ** (1 / 3), rel=1e-5)
    assert m.extrapolated == (False, False, False) and m.unreachable == (False, False, False)
    assert m.interval.contains(m.geometric_mean) and 2.0 - 1e-4 <= m.interval.low <= m.interval.high <= 4.0 + 1e-4
    assert m.t_interval.contains(m.geometric_mean) and m.t_interval.method == "t"
    assert m.dense_flops_needed == pytest.approx([k * 1e16 for k in ks], rel=1e-5)
    assert len(m.fits) == 3 and m == compute_multiplier(ladders, dense_loss, [1e16] * 3, [_moe_curve(1e16)] * 3)


def test_compute_multiplier_flags_extrapolated_and_unreachable():
    dense = [_moe_curve(x / 2.0) for x in FLOPS]
    below_ladder = _moe_curve(1e19)  # dense at 2e19: past the measured ladder (max 1e18)
    m = compute_multiplier([list(FLOPS)] * 3, [dense] * 3, [1e16, 1e19, 1e16], [_moe_curve(1e16), below_ladder, 1.4])
    assert m.per_seed[:2] == pytest.approx((2.0, 2.0), rel=1e-4)
    assert m.extrapolated == (False, True, True) and m.unreachable == (False, False, True)
    assert math.isinf(m.per_seed[2]) and math.isinf(m.geometric_mean) and math.isinf(m.interval.high)
    assert not m.t_interval.defined
    blob = json.loads(json.dumps(m.to_json(), allow_nan=False))
    assert blob["per_seed"][2] is None and blob["unreachable"][2] is True


def test_compute_multiplier_single_seed_and_bad_input():
    m = compute_multiplier([list(FLOPS)], [[_moe_curve(x / 3.0) for x in FLOPS]], [1e16], [_moe_curve(1e16)])
    assert m.geometric_mean == pytest.approx(3.0, rel=1e-5) and not m.interval.defined
    with pytest.raises(ValueError, match="one dense ladder"):
        compute_multiplier([list(FLOPS)], [], [1e16], [2.0])

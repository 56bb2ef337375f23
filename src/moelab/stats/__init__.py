"""Statistics for claims measured over seeds: paired differences, intervals, tests, Holm, verdicts,
and the saturating power law behind the compute multiplier. Pure functions over floats (numpy +
scipy); nothing here knows about models, runs or files.

Why paired differences. Two arms trained with the same seed share their data order and their
validation batches, so much of what makes seed 0 easy or hard for one arm makes it easy or hard
for the other. The per-seed difference ``d_s = a_s - b_s`` cancels that shared part; its spread
is the noise that actually blurs the comparison. Comparing the pooled, unpaired spreads of the two
arms instead counts the shared seed effect twice and can call a consistent gap "inconclusive".

Why two intervals. With 2-5 seeds the one-sample t interval on the differences is the honest
one: exact when the differences are roughly normal, and wide when n is small, as it should be.
The percentile bootstrap assumes no shape, but with n seeds it only sees n**n resamples (27 for
n = 3), so it is too narrow at small n; it is reported beside the t interval as a check on
the normality assumption, and the verdict is decided on the t test.

Why Holm. When one claim compares an arm with several others (MoE vs the iso-active and the
iso-total twin), the chance that at least one test is "significant" by luck grows with the
number of tests. Holm's step-down correction keeps that family-wise error at ``alpha`` without
assuming the tests are independent, and never rejects less than Bonferroni does.

Why an effect-size floor. With enough seeds any nonzero gap becomes significant; a claim should
name the smallest difference that matters (``Rule.min_effect``, in metric units). A significant
difference below it is not a finding, and an interval lying entirely inside ``±min_effect`` is
positive evidence that there is no effect worth having ("not supported").

Why a saturating power law. Loss falls with compute as a power law towards an irreducible floor:
``L(x) = a * (x / x0) ** (-b) + c``. A plain power law (``c = 0``) bends the fit wrongly near the
floor. We fit in loss space (where the measurement noise lives) and keep ``0 <= c < min(y)`` so
every measured loss lies above the floor.

Why the compute multiplier. "Dense needs X times the FLOPs to reach the MoE's loss" is read off
the dense model's fitted curve: invert it at the MoE's loss, divide by the MoE's FLOPs. It is done
per seed (each seed's dense ladder gets its own fit) so the seed-to-seed spread carries into an
interval; seeds are combined by the geometric mean because multipliers are ratios.
"""

from moelab.stats._common import VERDICTS
from moelab.stats.curves import Multiplier, PowerLaw, compute_multiplier, fit_power_law
from moelab.stats.intervals import (
    Interval,
    bootstrap_difference_interval,
    bootstrap_interval,
    holm,
    label_permutation_test,
    sign_flip_test,
    sign_test,
    t_interval,
    t_test,
    welch_interval,
    welch_test,
)
from moelab.stats.verdicts import (
    Comparison,
    Rule,
    Verdict,
    decide,
    decide_all,
    paired_difference,
    unpaired_difference,
)

__all__ = [
    "VERDICTS", "Comparison", "Interval", "Multiplier", "PowerLaw", "Rule", "Verdict",
    "bootstrap_difference_interval", "bootstrap_interval", "compute_multiplier", "decide", "decide_all",
    "fit_power_law", "holm", "label_permutation_test", "paired_difference", "sign_flip_test", "sign_test",
    "t_interval", "t_test", "unpaired_difference", "welch_interval", "welch_test",
]  # fmt: skip

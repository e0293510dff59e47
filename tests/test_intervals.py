"""The interval mechanism (llmpipe.evaluation.intervals) on per-item data whose answer is
known."""

import math
import random

import pytest

from llmpipe.errors import DataError
from llmpipe.evaluation.intervals import (
    Z_95,
    estimate,
    gain_metrics,
    holm_rejections,
    level_metrics,
    paired_difference,
    ratio_estimate,
    two_sided_p,
)


def test_the_estimate_is_the_mean_with_its_standard_error():
    values = [1.0, 2.0, 3.0, 4.0]  # sample variance 5/3
    e = estimate(values)
    assert e.mean == 2.5 and e.n == 4
    assert e.se == pytest.approx(math.sqrt(5 / 3 / 4))
    assert (e.lo, e.hi) == pytest.approx((2.5 - Z_95 * e.se, 2.5 + Z_95 * e.se))


def test_a_bernoulli_mean_covers_its_probability_at_the_nominal_rate():
    rng = random.Random(0)
    covered = 0
    for _ in range(400):
        e = estimate([float(rng.random() < 0.3) for _ in range(200)])
        assert e.se == pytest.approx(math.sqrt(e.mean * (1 - e.mean) / 199), rel=1e-12)
        covered += e.lo <= 0.3 <= e.hi
    assert 0.91 <= covered / 400 <= 0.98  # 95% nominal


def test_a_paired_difference_of_identical_runs_is_exactly_zero_with_zero_width():
    rng = random.Random(1)
    run = [rng.random() for _ in range(100)]
    d = paired_difference(run, list(run))
    assert (d.mean, d.se, d.lo, d.hi) == (0.0, 0.0, 0.0, 0.0)
    assert d.direction() == "within noise" and two_sided_p(d) == 1.0


def test_a_ratio_over_items_is_the_ratio_of_sums_with_the_delta_method_error():
    rng = random.Random(3)
    kl = [rng.expovariate(1.0) for _ in range(150)]
    same_length = ratio_estimate(kl, [8.0] * len(kl))  # then it is a plain mean over 8
    assert same_length.mean == pytest.approx(sum(kl) / (8 * len(kl)))
    assert same_length.se == pytest.approx(estimate(kl).se / 8)
    lengths = [rng.randint(4, 24) for _ in kl]
    per_token = [0.05 * n + rng.gauss(0, 0.1) for n in lengths]  # 0.05 nats a token
    e = ratio_estimate(per_token, lengths)
    assert e.mean == pytest.approx(sum(per_token) / sum(lengths))
    assert e.lo < 0.05 < e.hi and e.hi - e.lo < 0.01
    with pytest.raises(DataError, match="differ in number"):
        ratio_estimate([1.0], [1.0, 2.0])


def test_pairing_removes_what_the_items_share():
    rng = random.Random(2)
    difficulty = [rng.gauss(0, 1) for _ in range(200)]
    before = [x + rng.gauss(0, 0.1) for x in difficulty]
    after = [x + 0.1 + rng.gauss(0, 0.1) for x in difficulty]
    paired = paired_difference(before, after)
    unpaired_se = math.hypot(estimate(before).se, estimate(after).se)
    assert paired.direction() == "up"  # the shift shows once the items' spread cancels...
    assert paired.se < unpaired_se / 5  # ...which an unpaired comparison cannot see
    assert paired_difference(after, before).direction() == "down"


def test_reports_give_levels_with_standard_errors_and_paired_gains():
    def report(scores):
        items = [{"prompt": f"q{i}", "exact_match": s} for i, s in enumerate(scores)]
        return {"exact_match": sum(scores) / len(scores), "distinct": 0.5, "items": items}

    before, after = report([0.0, 1.0, 0.0, 1.0]), report([1.0, 1.0, 0.0, 1.0])
    levels = level_metrics(after, "after_")
    assert levels["after_exact_match"] == 0.75 and levels["after_distinct"] == 0.5
    assert "after_distinct_se" not in levels  # no per-item values: no interval invented
    assert levels["after_exact_match_se"] == pytest.approx(estimate([1, 1, 0, 1]).se)
    gains = gain_metrics(before, after, {"exact_match": "gain"})
    assert gains["gain"] == 0.25
    assert gains["gain_lo"] < 0 < gains["gain_hi"]  # one problem of four: within noise
    other = report([1.0, 1.0, 0.0, 1.0])
    other["items"][0]["prompt"] = "another problem"
    with pytest.raises(DataError, match="same items"):
        gain_metrics(before, other, {"exact_match": "gain"})


def test_holm_controls_the_family_and_rejects_in_order_of_strength():
    assert holm_rejections([0.001, 0.04, 0.03, 0.5]) == [True, False, False, False]
    assert holm_rejections([0.01, 0.02, 0.03]) == [True, True, True]  # 0.0167, 0.025, 0.05
    assert holm_rejections([]) == []

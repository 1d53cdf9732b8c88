import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from s2l_guard.metrics import tpr_at_fpr
from s2l_guard.stats import (
    calibrated_tpr_delta,
    candidate_shares,
    delong_test,
    distinct_extracted,
    excess_extraction,
    extraction_delta,
    paired_bootstrap_delta,
)


def paired_scores(rng, n=100, gain=0.0):
    """Two models scoring the same samples: a shared per-sample signal plus model noise.

    Members sit 0.5 above non-members for both models; the "after" model adds
    ``gain`` to members only. With gain 0 both models have the same AUC.
    """
    signal_m, signal_n = rng.normal(0.5, 1, n), rng.normal(0, 1, n)
    noise = lambda: rng.normal(0, 0.7, n)  # noqa: E731
    return signal_m + noise(), signal_n + noise(), signal_m + gain + noise(), signal_n + noise()


def sk_auc(members, nonmembers):
    return roc_auc_score(np.r_[np.ones(len(members)), np.zeros(len(nonmembers))], np.r_[members, nonmembers])


def rejection_rates(gain, datasets=200):
    """Share of data sets on which each test rejects "no change" at alpha = 0.05."""
    rng = np.random.default_rng(0)
    boot = delong = 0
    for i in range(datasets):
        data = paired_scores(rng, gain=gain)
        boot += paired_bootstrap_delta(*data, resamples=200, seed=i).p_value < 0.05
        delong += delong_test(*data).p_value < 0.05
    return boot / datasets, delong / datasets


def test_paired_tests_hold_their_size_under_the_null():
    boot, delong = rejection_rates(gain=0.0)
    # 200 data sets at a true rate of 0.05: 10 +- 3 rejections; the band is about +-3 sd.
    assert 0.01 <= boot <= 0.10
    assert 0.01 <= delong <= 0.10


def test_paired_tests_have_power_against_a_real_gain():
    boot, delong = rejection_rates(gain=0.5)  # AUC about 0.64 -> 0.77
    assert boot > 0.8 and delong > 0.8


def test_delong_aucs_equal_sklearn_and_agree_with_the_paired_bootstrap():
    bm, bn, am, an = paired_scores(np.random.default_rng(5), n=200, gain=0.3)
    delong = delong_test(bm, bn, am, an)
    boot = paired_bootstrap_delta(bm, bn, am, an, resamples=2000, seed=1)
    assert delong.before == pytest.approx(sk_auc(bm, bn), abs=1e-12)
    assert delong.after == pytest.approx(sk_auc(am, an), abs=1e-12)
    assert delong.delta == pytest.approx(boot.delta, abs=1e-12) and delong.delta > 0
    assert np.sign(delong.low) == np.sign(boot.low) and np.sign(delong.high) == np.sign(boot.high)
    assert 0.8 < delong.se / boot.se < 1.25
    assert delong.low == pytest.approx(delong.delta - 1.959964 * delong.se, abs=1e-6)


def test_delong_variance_matches_the_pairwise_definition_with_ties():
    # DeLong et al. (1988) through the explicit kernel psi(x, y) = 1[x > y] + 1/2 1[x = y].
    rng = np.random.default_rng(6)
    bm, bn, am, an = (rng.integers(0, 8, size).astype(float) for size in (40, 30, 40, 30))
    bm, am = bm + 1, am + 2

    def components(members, nonmembers):
        psi = (members[:, None] > nonmembers[None]) + 0.5 * (members[:, None] == nonmembers[None])
        return psi.mean(1), psi.mean(0)

    (b10, b01), (a10, a01) = components(bm, bn), components(am, an)
    var = np.cov(a10 - b10) / 40 + np.cov(a01 - b01) / 30
    result = delong_test(bm, bn, am, an)
    assert result.se == pytest.approx(np.sqrt(var), rel=1e-10)
    assert result.before == pytest.approx(sk_auc(bm, bn), abs=1e-12)
    assert result.after == pytest.approx(sk_auc(am, an), abs=1e-12)


def test_identical_models_show_no_change():
    bm, bn, _, _ = paired_scores(np.random.default_rng(7))
    for result in (delong_test(bm, bn, bm, bn), paired_bootstrap_delta(bm, bn, bm, bn, resamples=100)):
        assert result.delta == 0 and result.p_value == 1.0 and result.low == result.high == 0


def test_callable_statistic_gets_the_same_replicates_as_its_name():
    bm, bn, am, an = paired_scores(np.random.default_rng(8), gain=0.2)
    for name, fn in (("auc", sk_auc), ("tpr@0.1", lambda m, n: tpr_at_fpr(m, n, 0.1))):
        named = paired_bootstrap_delta(bm, bn, am, an, statistic=name, resamples=150, seed=3)
        called = paired_bootstrap_delta(bm, bn, am, an, statistic=fn, resamples=150, seed=3)
        for field in ("before", "after", "delta", "low", "high", "se", "p_value"):
            assert getattr(called, field) == pytest.approx(getattr(named, field), abs=1e-12)
    assert called.statistic == "<lambda>" and named.statistic == "tpr@0.1"


def test_paired_result_is_seeded_and_serialisable():
    data = paired_scores(np.random.default_rng(9), gain=0.3)
    result = paired_bootstrap_delta(*data, statistic="tpr@0.05", resamples=100, seed=2)
    assert paired_bootstrap_delta(*data, statistic="tpr@0.05", resamples=100, seed=2) == result
    assert result.low <= result.delta <= result.high and result.resamples == 100
    assert result.n == {"members": 100, "nonmembers": 100}
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["ci95"] == [result.low, result.high] and payload["method"] == "paired stratified bootstrap"
    assert json.loads(json.dumps(delong_test(*data).to_dict()))["resamples"] is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d[0][:-1], *d[1:]), "before_members has 99 scores but after_members has 100"),
        (lambda d: (*d[:3], d[3][:-1]), "before_nonmembers has 100 scores but after_nonmembers has 99"),
        (lambda d: (np.r_[d[0][:-1], np.nan], *d[1:]), "NaN or infinite"),
        (lambda d: ([], *d[1:]), "before_members is empty"),
    ],
)
def test_bad_paired_input_is_refused(change, message):
    data = change(paired_scores(np.random.default_rng(10)))
    for test in (paired_bootstrap_delta, delong_test):
        with pytest.raises(ValueError, match=message):
            test(*data)


@pytest.mark.parametrize("statistic", ["tpr@1.5", "tpr@x", "accuracy"])
def test_unknown_statistic_is_refused(statistic):
    with pytest.raises(ValueError, match="unknown statistic"):
        paired_bootstrap_delta(*paired_scores(np.random.default_rng(11)), statistic=statistic)


def test_delong_needs_two_samples_per_class():
    with pytest.raises(ValueError, match="at least 2 members"):
        delong_test([1.0], [0.0, 0.5], [1.0], [0.0, 0.5])


# --- extraction -----------------------------------------------------------------------------


def test_extraction_counts_distinct_images_once():
    before = np.array([3, 3, -1, 5, 3, -1])
    after = np.array([1, 1, 1, -1, 7, 9])
    result = extraction_delta(before, after, resamples=200)
    assert result.before == len({3, 5}) and result.after == len({1, 7, 9})
    assert distinct_extracted(before) == 2 and distinct_extracted(np.full(4, -1)) == 0
    assert result.delta == 1 and result.n == {"candidates": 6}
    assert result.low <= result.delta <= result.high


def test_extraction_refuses_unequal_candidate_counts():
    with pytest.raises(ValueError, match="4 candidates but after has 5"):
        extraction_delta([1, -1, 2, 3], [1, -1, 2, 3, 4])


@pytest.mark.parametrize("hits", [[0.5, 1.0], [-2, 1], [], [[1, -2]], [[1, "a"]]])
def test_extraction_refuses_malformed_hits(hits):
    with pytest.raises(ValueError, match="before_hits"):
        extraction_delta(hits, [1] * max(1, len(hits)))


def test_extraction_without_any_hit_is_zero_with_p_one():
    result = extraction_delta(np.full(50, -1), np.full(50, -1), resamples=100)
    assert (result.before, result.after, result.delta, result.low, result.high, result.p_value) == (0, 0, 0, 0, 0, 1)


@pytest.mark.parametrize("pool", [5000, 40])  # mostly single hits / mostly repeated hits
def test_extraction_interval_covers_the_true_difference(pool):
    """Simulate models that extract a uniformly random image of ``pool`` with probability p.

    The expected distinct count of c candidates is pool * (1 - (1 - p / pool)^c);
    the 95% interval of the difference should cover the true difference about 95%
    of the time (resampling and recounting distinct images covers ~5% here).
    """
    rng = np.random.default_rng(pool)
    c, p_after, p_before = 200, 0.3, 0.1
    truth = pool * ((1 - p_before / pool) ** c - (1 - p_after / pool) ** c)

    def candidates(p):
        hits = rng.integers(0, pool, c)
        hits[rng.random(c) > p] = -1
        return hits

    covered = [(r := extraction_delta(candidates(p_before), candidates(p_after), resamples=200, seed=i)).low <= truth <= r.high for i in range(200)]
    assert np.mean(covered) >= 0.9


def test_several_images_per_candidate_count_each_distinct_image_once():
    before = [[3, 4], [3], [], [-1]]
    after = [[1], [1, 2], [2, 7], []]
    result = extraction_delta(before, after, resamples=200)
    assert result.before == 2 and result.after == 3 and result.delta == 1
    assert candidate_shares(after).sum() == pytest.approx(3)  # shares still sum to the distinct count


def test_excess_extraction_subtracts_the_nonmembers_the_same_candidates_match():
    hits = [[0], [0], [1], [], []]
    null = [[5], [], [], [6], []]
    out = excess_extraction(hits, null, resamples=300)
    assert out["members_matched"] == 2 and out["nonmembers_matched"] == 2 and out["excess"] == pytest.approx(0)
    assert out["ci95"][0] < 0 < out["ci95"][1]
    weighted = excess_extraction(hits, null, null_weight=0.5, resamples=300)  # twice as many non-members as members
    assert weighted["excess"] == pytest.approx(1)
    with pytest.raises(ValueError, match="same candidates"):
        candidate_shares(hits, null[:3])


def _in_sample_and_calibrated(seed, n=300, shift=1.2):
    """True TPR at 1% FPR of N(shift, 1) members vs N(0, 1) non-members is 1 - Phi(z_0.99 - shift)."""
    rng = np.random.default_rng(seed)
    bm, bn = rng.normal(shift, 1, n), rng.normal(0, 1, n)
    am, an = bm + rng.normal(0, 0.05, n), bn + rng.normal(0, 0.05, n)
    return calibrated_tpr_delta(bm, bn, am, an, resamples=200, seed=seed), bm, bn


def test_calibrated_tpr_delta_measures_on_samples_the_threshold_never_saw():
    from scipy.stats import norm

    truth = 1 - norm.cdf(norm.ppf(0.99) - 1.2)
    results = [_in_sample_and_calibrated(seed)[0] for seed in range(60)]
    assert all(r["resolvable"] and r["n"]["test_nonmembers"] == 150 for r in results)
    # unbiased for the true TPR (the in-sample figure is biased upward), and about 1% FPR on new samples
    assert abs(np.mean([r["before"] for r in results]) - truth) < 0.02
    assert np.mean([r["fpr_on_test"]["before"] for r in results]) < 0.025
    small = calibrated_tpr_delta([1.0] * 40, [0.0] * 40, [1.0] * 40, [0.0] * 40, resamples=50)
    assert not small["resolvable"]  # 20 test non-members cannot resolve 1%


def test_calibrated_tpr_delta_is_paired_on_the_same_test_members():
    rng = np.random.default_rng(3)
    m, n = rng.normal(1, 1, 400), rng.normal(0, 1, 400)
    same = calibrated_tpr_delta(m, n, m, n, resamples=100)
    assert same["delta"] == 0 and same["ci95"] == [0, 0]
    shifted = calibrated_tpr_delta(m, n, m + 1, n, resamples=300)
    assert shifted["delta"] > 0 and shifted["ci95"][0] > 0


def test_minimum_detectable_delta_is_detected_with_the_stated_power():
    from s2l_guard.stats import minimum_detectable_delta

    rng = np.random.default_rng(0)
    se = 0.015
    mde = minimum_detectable_delta(se)
    assert mde == pytest.approx(2.8016 * se, rel=1e-3)
    estimates = rng.normal(mde, se, 20000)  # a true change of the MDE, measured with that error
    assert np.mean(np.abs(estimates / se) > 1.96) == pytest.approx(0.8, abs=0.01)
    assert minimum_detectable_delta(se, scale=4) == pytest.approx(mde / 2)

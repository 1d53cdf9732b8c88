import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score, roc_curve

from s2l_guard.metrics import (
    auc,
    auc_replicates,
    calibration_split,
    fit_threshold,
    index_counts,
    metrics_to_dict,
    roc_metrics,
    threshold_protocol,
    tpr_at_fpr,
    tpr_at_fpr_replicates,
)


def sklearn_metrics(members, nonmembers, fpr, weights=None):
    """AUC and LiRA's TPR at FPR straight from scikit-learn."""
    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    s = np.r_[members, nonmembers]
    fprs, tprs, _ = roc_curve(y, s, sample_weight=weights, drop_intermediate=False)
    return roc_auc_score(y, s, sample_weight=weights), tprs[fprs <= fpr].max()


def tied_scores(seed, m=300, n=400):
    """Integer scores, so members and non-members tie often."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 20, m) + 3.0, rng.integers(0, 20, n).astype(float)


def continuous_scores(seed, m=300, n=400):
    rng = np.random.default_rng(seed)
    return rng.normal(0.7, 1, m), rng.normal(0, 1, n)


@pytest.mark.parametrize("make", [tied_scores, continuous_scores])
@pytest.mark.parametrize("fpr", [0.001, 0.01, 0.1, 0.5])
def test_point_estimates_equal_sklearn(make, fpr):
    members, nonmembers = make(0)
    want_auc, want_tpr = sklearn_metrics(members, nonmembers, fpr)
    assert auc(members, nonmembers) == pytest.approx(want_auc, abs=1e-12)
    assert tpr_at_fpr(members, nonmembers, fpr) == pytest.approx(want_tpr, abs=1e-12)
    result = roc_metrics(members, nonmembers, fprs=[fpr], resamples=20)
    assert result["auc"].value == pytest.approx(want_auc, abs=1e-12)
    assert result["tpr_at_fpr"][fpr].value == pytest.approx(want_tpr, abs=1e-12)


@pytest.mark.parametrize("make", [tied_scores, continuous_scores])
@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.3])
def test_replicates_equal_sklearn_with_counts_as_sample_weights(make, fpr):
    members, nonmembers = make(1)
    rng = np.random.default_rng(2)
    counts_m = index_counts(rng.integers(0, len(members), (6, len(members))), len(members))
    counts_n = index_counts(rng.integers(0, len(nonmembers), (6, len(nonmembers))), len(nonmembers))
    assert (counts_m.sum(1) == len(members)).all() and (counts_m == 0).any()  # real resamples, some dropped
    aucs = auc_replicates(members, nonmembers, counts_m, counts_n)
    tprs = tpr_at_fpr_replicates(members, nonmembers, counts_m, counts_n, fpr)
    for r in range(6):
        want_auc, want_tpr = sklearn_metrics(members, nonmembers, fpr, np.r_[counts_m[r], counts_n[r]])
        assert aucs[r] == pytest.approx(want_auc, abs=1e-12)
        assert tprs[r] == pytest.approx(want_tpr, abs=1e-12)


samples = st.lists(st.integers(-20, 20), min_size=1, max_size=40).map(lambda v: np.array(v, dtype=float))


@settings(max_examples=60, deadline=None)
@given(members=samples, nonmembers=samples)
def test_swapping_roles_gives_one_minus_auc(members, nonmembers):
    forward = roc_metrics(members, nonmembers, resamples=10)["auc"].value
    assert roc_metrics(nonmembers, members, resamples=10)["auc"].value == pytest.approx(1 - forward, abs=1e-12)
    counts_m, counts_n = np.ones((1, len(members))), np.ones((1, len(nonmembers)))
    assert auc_replicates(nonmembers, members, counts_n, counts_m)[0] == pytest.approx(1 - forward, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(members=samples, nonmembers=samples, seed=st.integers(0, 100))
def test_strictly_increasing_transform_changes_nothing(members, nonmembers, seed):
    # exp(x/7) and x**3 are strictly increasing and keep distinct integers distinct
    # in float, so every ROC point and every bootstrap replicate is the same.
    base = roc_metrics(members, nonmembers, fprs=(0.05, 0.3), resamples=30, seed=seed)
    for transform in (lambda x: np.exp(x / 7), lambda x: x**3):
        assert roc_metrics(transform(members), transform(nonmembers), fprs=(0.05, 0.3), resamples=30, seed=seed) == base


@settings(max_examples=60, deadline=None)
@given(
    members=st.lists(st.floats(-5, 5), min_size=2, max_size=60).map(np.array),
    nonmembers=st.lists(st.floats(-5, 5), min_size=2, max_size=60).map(np.array),
)
def test_intervals_contain_the_point_estimate(members, nonmembers):
    result = roc_metrics(members, nonmembers, fprs=(0.01, 0.1, 0.5), resamples=200)
    for est in [result["auc"], *result["tpr_at_fpr"].values()]:
        assert est.low <= est.value <= est.high
        assert 0 <= est.low and est.high <= 1 and est.n == len(members) + len(nonmembers)


def test_interval_is_seeded_and_narrows_with_more_samples():
    small = roc_metrics(*continuous_scores(3, 100, 100), resamples=300, seed=4)
    assert roc_metrics(*continuous_scores(3, 100, 100), resamples=300, seed=4) == small
    large = roc_metrics(*continuous_scores(3, 2000, 2000), resamples=300, seed=4)
    width = lambda e: e.high - e.low  # noqa: E731
    assert width(large["auc"]) < width(small["auc"]) / 2
    assert abs(large["auc"].value - 0.69) < 0.03  # Phi(0.7 / sqrt 2) for the simulated shift


def test_unresolvable_fpr_is_flagged_and_still_estimated():
    members, nonmembers = continuous_scores(5, 300, 500)
    result = roc_metrics(members, nonmembers, fprs=(0.01, 0.001), resamples=50)
    assert result["resolvable"] == {0.01: True, 0.001: False}
    # 0.001 < 1/500 allows no false positive, exactly like any smaller target.
    assert result["tpr_at_fpr"][0.001].value == tpr_at_fpr(members, nonmembers, 1e-9)
    assert (result["n_members"], result["n_nonmembers"], result["resamples"]) == (300, 500, 50)


def test_metrics_to_dict_is_json_ready():
    result = metrics_to_dict(roc_metrics(*continuous_scores(6, 50, 50), resamples=20))
    back = json.loads(json.dumps(result))
    assert back == result
    assert set(back["tpr_at_fpr"]) == {"0.01", "0.001"}
    assert set(back["auc"]) == {"value", "ci95", "n"}
    protocol = metrics_to_dict(threshold_protocol(*continuous_scores(6, 50, 50), resamples=20))
    assert json.loads(json.dumps(protocol)) == protocol


@pytest.mark.parametrize(
    "members, nonmembers, kwargs, message",
    [
        ([], [1.0], {}, "member_scores is empty"),
        ([1.0, np.nan], [1.0], {}, "NaN or infinite"),
        ([1.0], [np.inf], {}, "NaN or infinite"),
        ([[1.0, 2.0]], [1.0], {}, "1-D"),
        ([1.0], [0.0], {"fprs": (0.0,)}, r"outside \(0, 1\)"),
        ([1.0], [0.0], {"fprs": (1.5,)}, r"outside \(0, 1\)"),
        ([1.0], [0.0], {"resamples": 0}, "resamples"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(members, nonmembers, kwargs, message):
    with pytest.raises(ValueError, match=message):
        roc_metrics(members, nonmembers, **kwargs)


# --- threshold protocol ---------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(m=st.integers(2, 300), n=st.integers(2, 300), share=st.floats(0.2, 0.8), seed=st.integers(0, 10))
def test_calibration_and_test_parts_are_disjoint_and_cover_the_inputs(m, n, share, seed):
    split = calibration_split(m, n, calibration_share=share, seed=seed)
    for name, size in (("members", m), ("nonmembers", n)):
        cal, test = split[f"calibration_{name}"], split[f"test_{name}"]
        assert len(cal) and len(test) and not set(cal) & set(test)
        assert np.array_equal(np.sort(np.r_[cal, test]), np.arange(size))
        assert abs(len(cal) - share * size) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(split.values(), calibration_split(m, n, calibration_share=share, seed=seed).values()))


def test_protocol_fits_on_calibration_non_members_and_reports_on_the_test_part():
    members, nonmembers = continuous_scores(7, 400, 600)
    result = threshold_protocol(members, nonmembers, fprs=(0.05,), calibration_share=0.3, seed=8, resamples=100)
    split = calibration_split(400, 600, calibration_share=0.3, seed=8)
    cal_n = nonmembers[split["calibration_nonmembers"]]
    test_m, test_n = members[split["test_members"]], nonmembers[split["test_nonmembers"]]
    assert result["split"]["calibration"] == {"members": 120, "nonmembers": 180}
    assert result["split"]["test"] == {"members": 280, "nonmembers": 420}
    fitted = result["fit_on_calibration"][0.05]
    assert fitted["threshold"] == fit_threshold(cal_n, 0.05)
    assert fitted["calibration_fpr"] == np.mean(cal_n > fitted["threshold"]) <= 0.05
    assert fitted["tpr"].value == np.mean(test_m > fitted["threshold"]) and fitted["tpr"].n == 280
    assert fitted["fpr"].value == np.mean(test_n > fitted["threshold"]) and fitted["fpr"].n == 420
    # Fitting on the test part reproduces the ROC-curve TPR at FPR of that part.
    optimistic = result["optimistic_fit_on_test"][0.05]
    assert optimistic["tpr"].value == pytest.approx(tpr_at_fpr(test_m, test_n, 0.05), abs=1e-12)
    assert optimistic["fpr"].value <= 0.05


@pytest.mark.parametrize("fpr", [0.01, 0.1, 0.37])
def test_fit_threshold_is_the_smallest_meeting_the_target(fpr):
    nonmembers = tied_scores(9)[1]
    t = fit_threshold(nonmembers, fpr)
    assert np.mean(nonmembers > t) <= fpr
    lower = nonmembers[nonmembers < t]
    assert len(lower) == 0 or np.mean(nonmembers > lower.max()) > fpr


def test_well_separated_scores_give_high_test_tpr():
    rng = np.random.default_rng(10)
    result = threshold_protocol(rng.normal(6, 1, 1000), rng.normal(0, 1, 1000), resamples=100)
    for fpr in (0.01, 0.001):
        assert result["fit_on_calibration"][fpr]["tpr"].value > 0.95
    assert result["fit_on_calibration"][0.01]["resolvable"] and not result["fit_on_calibration"][0.001]["resolvable"]


def test_identical_distributions_achieve_the_target_fpr_within_sampling_error():
    rng = np.random.default_rng(11)
    result = threshold_protocol(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000), fprs=(0.1,), resamples=200)
    fitted = result["fit_on_calibration"][0.1]
    # 1000 calibration and 1000 test non-members: the achieved FPR has a standard
    # deviation of about sqrt(2 * 0.1 * 0.9 / 1000) = 0.013 around 0.1; allow 3 of them.
    assert abs(fitted["fpr"].value - 0.1) < 0.04
    assert abs(fitted["tpr"].value - 0.1) < 0.04  # no signal: TPR = FPR
    assert fitted["fpr"].low < 0.1 < fitted["fpr"].high


@pytest.mark.parametrize(
    "m, n, kwargs, message",
    [
        (1, 10, {}, "1 members cannot be split"),
        (10, 1, {}, "1 nonmembers cannot be split"),
        (10, 10, {"calibration_share": 1.0}, "calibration_share"),
        (10, 10, {"calibration_share": 0.0}, "calibration_share"),
    ],
)
def test_protocol_refuses_impossible_splits(m, n, kwargs, message):
    with pytest.raises(ValueError, match=message):
        threshold_protocol(np.arange(m, dtype=float), np.arange(n, dtype=float), **kwargs)

"""Amplification statistics: is the model after fine-tuning leakier than before?

Shake-to-Leak (Li et al., "Shake to Leak: Fine-tuning Diffusion Models Can
Amplify the Generative Privacy Risk", IEEE SaTML 2024) reports leakage "after
minus before". For membership inference both models score the SAME member and
non-member samples, so the two score vectors are paired per sample and the
tests below exploit that pairing (a paired test is much tighter than comparing
two independent intervals). Extraction compares two independent sets of
generations, at equal candidate counts.

Scores follow :mod:`s2l_guard.metrics`: higher = more likely a member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable

import numpy as np

from .errors import InputError
from .metrics import (
    auc,
    auc_replicates,
    calibration_split,
    check_fpr,
    check_resamples,
    fit_threshold,
    index_counts,
    resample_indices,
    scores_array,
    tpr_at_fpr,
    tpr_at_fpr_replicates,
)

Statistic = Callable[[np.ndarray, np.ndarray], float]

_Z975 = NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class DeltaTest:
    """A before/after comparison: both values, their difference, a 95% interval and a test.

    ``se`` is the standard error of ``delta`` (bootstrap standard deviation, or
    DeLong's analytic one); ``p_value`` is two-sided for "no change";
    ``n`` holds the sample counts; ``resamples`` is None for analytic tests.
    """

    statistic: str
    method: str
    before: float
    after: float
    delta: float
    low: float
    high: float
    se: float
    p_value: float
    n: dict[str, int]
    resamples: int | None = None

    def __str__(self) -> str:
        return f"{self.statistic}: {self.before:.4f} -> {self.after:.4f}, delta {self.delta:+.4f} [{self.low:+.4f}, {self.high:+.4f}], p={self.p_value:.3g}"

    def to_dict(self) -> dict:
        return {
            "statistic": self.statistic,
            "method": self.method,
            "before": self.before,
            "after": self.after,
            "delta": self.delta,
            "ci95": [self.low, self.high],
            "se": self.se,
            "p_value": self.p_value,
            "n": dict(self.n),
            "resamples": self.resamples,
        }


def _paired(before, after, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated score arrays of one class, scored by both models, as a pair."""
    b, a = scores_array(before, f"before_{name}"), scores_array(after, f"after_{name}")
    if len(b) != len(a):
        raise InputError(
            f"before_{name} has {len(b)} scores but after_{name} has {len(a)}; score the same samples, in the same order, with both models"
        )
    return b, a


def _named_statistic(statistic: str) -> tuple[Statistic, Callable[..., np.ndarray]]:
    """Point function and vectorised replicate function of "auc" or "tpr@<fpr>"."""
    if statistic == "auc":
        return auc, auc_replicates
    if isinstance(statistic, str) and statistic.startswith("tpr@"):
        try:
            fpr = float(statistic[4:])
        except ValueError:
            fpr = math.nan
        if 0 < fpr < 1:
            return (
                lambda m, n: tpr_at_fpr(m, n, fpr),
                lambda m, n, cm, cn: tpr_at_fpr_replicates(m, n, cm, cn, fpr),
            )
    raise InputError(f"unknown statistic {statistic!r}; pass 'auc', 'tpr@<fpr>' such as 'tpr@0.01', or a callable")


def _replicates(statistic: str | Statistic, members: np.ndarray, nonmembers: np.ndarray, idx_m: np.ndarray, idx_n: np.ndarray) -> np.ndarray:
    """The statistic on each bootstrap replicate (rows of ``idx_m``, ``idx_n``)."""
    if callable(statistic):
        return np.array([statistic(members[i], nonmembers[j]) for i, j in zip(idx_m, idx_n)], dtype=float)
    replicate = _named_statistic(statistic)[1]
    return replicate(members, nonmembers, index_counts(idx_m, len(members)), index_counts(idx_n, len(nonmembers)))


def _bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p-value for "delta = 0": twice the smaller tail share at 0.

    This inverts the percentile interval (p < 0.05 iff 0 lies outside it, up to
    the +1 correction, which keeps p above 0 with finitely many replicates).
    """
    tail = min((deltas <= 0).sum(), (deltas >= 0).sum())
    return float(min(1.0, 2 * (tail + 1) / (len(deltas) + 1)))


def _interval_test(statistic: str, method: str, before: float, after: float, deltas: np.ndarray, n: dict[str, int]) -> DeltaTest:
    """A DeltaTest from the point values and the bootstrap replicates of the difference."""
    low, high = np.percentile(deltas, [2.5, 97.5])
    se = float(deltas.std(ddof=1)) if len(deltas) > 1 else 0.0
    return DeltaTest(statistic, method, before, after, after - before, float(low), float(high), se, _bootstrap_p(deltas), n, len(deltas))


def paired_bootstrap_delta(
    before_members,
    before_nonmembers,
    after_members,
    after_nonmembers,
    *,
    statistic: str | Statistic = "auc",
    resamples: int = 2000,
    seed: int = 0,
) -> DeltaTest:
    """Paired stratified bootstrap of a membership statistic's change, after minus before.

    Each replicate resamples member indices and non-member indices (stratified,
    with replacement) ONCE and applies the same indices to both models' scores,
    so the per-sample correlation between the two models is kept: the interval
    is that of the difference, not of two independent estimates. The interval is
    the 95% percentile interval of the replicate differences; the two-sided
    p-value inverts it (Efron & Tibshirani 1993, ch. 15-16).

    Args:
        before_members, before_nonmembers: scores of the model before fine-tuning.
        after_members, after_nonmembers: scores of the model after, on the same
            samples in the same order.
        statistic: "auc", "tpr@<fpr>" (e.g. "tpr@0.01", the LiRA convention of
            :func:`s2l_guard.metrics.tpr_at_fpr`), or a callable
            ``(member_scores, nonmember_scores) -> float``. Named statistics are
            vectorised; a callable is called twice per replicate.
        resamples: bootstrap replicates.
        seed: seed of the bootstrap; a callable computing the same statistic as a
            name gets identical replicates.

    Returns:
        A :class:`DeltaTest` with the before/after values, ``delta``, interval,
        bootstrap standard error and p-value.

    Raises:
        ValueError: an input is empty or not finite, paired lengths differ, the
            statistic is unknown, or ``resamples`` is below 1.
    """
    bm, am = _paired(before_members, after_members, "members")
    bn, an = _paired(before_nonmembers, after_nonmembers, "nonmembers")
    resamples = check_resamples(resamples)
    point = statistic if callable(statistic) else _named_statistic(statistic)[0]
    name = getattr(statistic, "__name__", "custom") if callable(statistic) else statistic
    rng = np.random.default_rng(seed)
    deltas = np.concatenate(
        [
            _replicates(statistic, am, an, idx_m, idx_n) - _replicates(statistic, bm, bn, idx_m, idx_n)
            for idx_m, idx_n in resample_indices(rng, (len(bm), len(bn)), resamples)
        ]
    )
    n = {"members": len(bm), "nonmembers": len(bn)}
    return _interval_test(name, "paired stratified bootstrap", float(point(bm, bn)), float(point(am, an)), deltas, n)


def calibrated_tpr_delta(
    before_members,
    before_nonmembers,
    after_members,
    after_nonmembers,
    *,
    fpr: float = 0.01,
    calibration_share: float = 0.5,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Change in the TPR an attacker achieves at a target FPR on *new* samples, after minus before.

    The in-sample TPR at 1% FPR (threshold chosen on the non-members it is judged on) is biased
    upward and its threshold's real FPR exceeds the target. Here, as in
    :func:`s2l_guard.metrics.threshold_protocol`: one seeded split (the same for both models,
    since it depends only on the sample counts and the seed) into calibration and test parts;
    each model's threshold is fitted on its own calibration non-members; each model's TPR is
    measured on the same test members; the interval is a paired bootstrap over those test members
    (conditional on the thresholds). ``resolvable`` is False when either part has fewer than
    ``1 / fpr`` non-members: the target FPR cannot then be told from 0.

    Returns:
        A :class:`DeltaTest` dict plus ``resolvable``, ``thresholds`` and ``fpr_on_test`` (each
        model's achieved FPR on the test non-members).
    """
    bm, am = _paired(before_members, after_members, "members")
    bn, an = _paired(before_nonmembers, after_nonmembers, "nonmembers")
    fpr = check_fpr(fpr)
    resamples = check_resamples(resamples)
    split = calibration_split(len(bm), len(bn), calibration_share=calibration_share, seed=seed)
    cal, test_m, test_n = split["calibration_nonmembers"], split["test_members"], split["test_nonmembers"]
    thresholds = {"before": fit_threshold(bn[cal], fpr), "after": fit_threshold(an[cal], fpr)}
    hit_b = (bm[test_m] > thresholds["before"]).astype(float)
    hit_a = (am[test_m] > thresholds["after"]).astype(float)
    rng = np.random.default_rng(seed)
    diffs = hit_a - hit_b
    deltas = np.concatenate([diffs[idx].mean(1) for (idx,) in resample_indices(rng, (len(diffs),), resamples)])
    n = {"test_members": len(test_m), "test_nonmembers": len(test_n), "calibration_nonmembers": len(cal)}
    test = _interval_test(f"tpr@{fpr:g} (threshold fitted on a calibration split)", "paired bootstrap over test members",
                          float(hit_b.mean()), float(hit_a.mean()), deltas, n)  # fmt: skip
    return test.to_dict() | {
        "resolvable": fpr >= 1 / min(len(cal), len(test_n)),
        "thresholds": thresholds,
        "fpr_on_test": {"before": float(np.mean(bn[test_n] > thresholds["before"])), "after": float(np.mean(an[test_n] > thresholds["after"]))},
    }


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2)[inverse]


def _delong_components(members: np.ndarray, nonmembers: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components via midranks (Sun & Xu 2014, alg. 1).

    ``v10[i]``: share of non-members member ``i`` outscores; ``v01[j]``: share of
    members that outscore non-member ``j`` (ties count one half). AUC is the
    mean of either.
    """
    m, n = len(members), len(nonmembers)
    pooled = _midranks(np.concatenate([members, nonmembers]))
    v10 = (pooled[:m] - _midranks(members)) / n
    v01 = 1.0 - (pooled[m:] - _midranks(nonmembers)) / m
    return float(v10.mean()), v10, v01


def delong_test(before_members, before_nonmembers, after_members, after_nonmembers) -> DeltaTest:
    """DeLong's test for the difference of two correlated AUCs on the same samples.

    DeLong, DeLong & Clarke-Pearson, "Comparing the Areas under Two or More
    Correlated ROC Curves" (Biometrics 1988), computed with the midrank
    algorithm of Sun & Xu (IEEE Signal Processing Letters 2014). The variance
    of ``AUC_after - AUC_before`` is ``var(d10)/m + var(d01)/n``, with ``d10``
    and ``d01`` the per-sample differences of the two models' structural
    components over the ``m`` members and ``n`` non-members; the test and the
    95% interval are normal. When the standard error is 0 (e.g. both models
    separate perfectly) z is 0 with p = 1 if the AUCs are equal, otherwise
    infinite with p = 0.

    Args:
        before_members, before_nonmembers: scores of the model before fine-tuning.
        after_members, after_nonmembers: scores of the model after, on the same
            samples in the same order.

    Returns:
        A :class:`DeltaTest` with both AUCs (equal to ``roc_auc_score``), the
        difference, its standard error, 95% interval and two-sided p-value.

    Raises:
        ValueError: an input is not finite, paired lengths differ, or a class
            has fewer than 2 samples (no variance estimate).
    """
    bm, am = _paired(before_members, after_members, "members")
    bn, an = _paired(before_nonmembers, after_nonmembers, "nonmembers")
    if min(len(bm), len(bn)) < 2:
        raise InputError(f"DeLong's test needs at least 2 members and 2 non-members, got {len(bm)} and {len(bn)}; score more samples")
    auc_b, v10_b, v01_b = _delong_components(bm, bn)
    auc_a, v10_a, v01_a = _delong_components(am, an)
    delta = auc_a - auc_b
    se = math.sqrt(np.var(v10_a - v10_b, ddof=1) / len(bm) + np.var(v01_a - v01_b, ddof=1) / len(bn))
    z = delta / se if se > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
    return DeltaTest(
        "auc", "DeLong", auc_b, auc_a, delta, delta - _Z975 * se, delta + _Z975 * se, se,
        math.erfc(abs(z) / math.sqrt(2)), {"members": len(bm), "nonmembers": len(bn)},
    )  # fmt: skip


def _hits(values, name: str) -> list[tuple[int, ...]]:
    """Validated per-candidate matches: the training images each candidate lies within delta of.

    An entry is a list of image indices (Carlini et al. count *every* image within delta of a
    generation, not only its nearest), or a single index, or -1 for none.
    """
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) == 0:
        raise InputError(f"{name} must be a non-empty list with one entry per generated candidate")
    out = []
    for entry in values:
        items = entry if isinstance(entry, (list, tuple, np.ndarray)) else [entry]
        items = items.tolist() if isinstance(items, np.ndarray) else list(items)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= -1 for i in items):
            raise InputError(f"{name} must hold integer training-image indices (or lists of them), or -1 where a candidate extracted nothing")
        out.append(tuple(sorted({int(i) for i in items if i >= 0})))
    return out


def distinct_extracted(hits) -> int:
    """Number of distinct images among per-candidate matches (see :func:`_hits`).

    Raises:
        ValueError: ``hits`` is empty or not integers >= -1.
    """
    return len({i for entry in _hits(hits, "hits") for i in entry})


def _shares(hits: list[tuple[int, ...]]) -> np.ndarray:
    """Each candidate's share of the distinct count: the sum over the images it matched of
    1/(candidates that matched that image), 0 for a miss.

    Summing the shares gives the distinct count; bootstrapping the shares is the
    linearised (influence-function) bootstrap of it.
    """
    counts: dict[int, int] = {}
    for entry in hits:
        for i in entry:
            counts[i] = counts.get(i, 0) + 1
    return np.array([sum(1.0 / counts[i] for i in entry) for entry in hits])


def candidate_shares(hits, null=None, *, null_weight: float = 1.0) -> np.ndarray:
    """Per candidate, its share of the distinct count of ``hits`` minus ``null_weight`` times its
    share of the distinct count of ``null`` (the same candidates matched against held-out images).

    Shares of disjoint image sets (other domains) can be concatenated: they pool into one count.
    """
    shares = _shares(_hits(hits, "hits"))
    if null is not None:
        null_hits = _hits(null, "null")
        if len(null_hits) != len(shares):
            raise InputError(f"hits have {len(shares)} candidates but null has {len(null_hits)}; match the same candidates against both")
        shares = shares - null_weight * _shares(null_hits)
    return shares


def share_sum_interval(shares: np.ndarray, *, resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of a sum of candidate shares, resampling candidates."""
    resamples = check_resamples(resamples)
    rng = np.random.default_rng(seed)
    replicates = np.concatenate([shares[idx].sum(1) for (idx,) in resample_indices(rng, (len(shares),), resamples)])
    return [float(np.percentile(replicates, 2.5)), float(np.percentile(replicates, 97.5))]


def excess_extraction(hits, null, *, null_weight: float = 1.0, resamples: int = 1000, seed: int = 0) -> dict:
    """Extraction above chance: distinct members matched minus ``null_weight`` x distinct held-out
    non-members matched by the *same* candidates (paired), with a bootstrap interval over candidates.

    A model that draws new, realistic images lies within delta of some member by chance as often as
    of some non-member; only the excess is memorization. ``null_weight`` = members / non-members
    puts the two counts on the same footing when the sets differ in size.
    """
    shares = candidate_shares(hits, null, null_weight=null_weight)
    return {"excess": float(shares.sum()), "ci95": share_sum_interval(shares, resamples=resamples, seed=seed),
            "members_matched": distinct_extracted(hits), "nonmembers_matched": distinct_extracted(null), "null_weight": null_weight,
            "candidates": len(shares), "method": "members minus weighted non-members matched by the same candidates; bootstrap of candidate shares"}  # fmt: skip


def extraction_delta(before_hits, after_hits, *, resamples: int = 2000, seed: int = 0) -> DeltaTest:
    """Change in the number of distinct training images extracted, after minus before.

    Carlini et al. 2023 count distinct extracted images among a fixed number of
    generations; the count grows with the number of generations, so two models
    are compared only at equal candidate counts. The two models' candidates are
    independent draws, so each model's candidates are bootstrapped independently
    (stratified by model).

    The replicates bootstrap each candidate's share of the distinct count
    (:func:`_shares`) instead of recounting distinct images in the resample:
    recounting is biased down (a resample keeps only ~63% of distinct
    candidates, so an image extracted once vanishes from ~37% of replicates)
    and its intervals are too narrow and can miss the estimate entirely. The
    shares bootstrap is centred on the observed count, exact in variance for
    images extracted once and conservative for images extracted several times.
    The interval is the 95% percentile interval of the replicate differences;
    the p-value inverts it.

    Args:
        before_hits, after_hits: for each generated candidate of that model, the
            index of the training image it extracted, or -1.
        resamples: bootstrap replicates.
        seed: seed of the bootstrap.

    Returns:
        A :class:`DeltaTest` of distinct counts (``before``, ``after``), ``delta``,
        interval, bootstrap standard error and p-value; ``n["candidates"]`` is the
        per-model candidate count.

    Raises:
        ValueError: the candidate counts differ, an input is empty or not
            integers >= -1, or ``resamples`` is below 1.
    """
    before, after = _hits(before_hits, "before_hits"), _hits(after_hits, "after_hits")
    if len(before) != len(after):
        raise InputError(
            f"before has {len(before)} candidates but after has {len(after)}; "
            "extraction counts are only comparable at equal candidate counts, so generate as many with both models"
        )
    return share_delta(_shares(before), _shares(after), statistic="distinct_extracted", resamples=resamples, seed=seed)


def share_delta(before: np.ndarray, after: np.ndarray, *, statistic: str, resamples: int = 2000, seed: int = 0) -> DeltaTest:
    """After minus before of two sums of candidate shares (:func:`candidate_shares`), each model's
    candidates bootstrapped independently; the building block of :func:`extraction_delta`."""
    if len(before) != len(after):
        raise InputError(f"before has {len(before)} candidates but after has {len(after)}; compare at equal candidate counts")
    resamples = check_resamples(resamples)
    rng = np.random.default_rng(seed)
    c = len(before)
    deltas = np.concatenate([after[idx_a].sum(1) - before[idx_b].sum(1) for idx_b, idx_a in resample_indices(rng, (c, c), resamples)])
    return _interval_test(
        statistic, "independent bootstrap of candidate shares",
        float(np.round(before.sum(), 9)), float(np.round(after.sum(), 9)), deltas, {"candidates": c},
    )  # fmt: skip


def minimum_detectable_delta(se: float, *, alpha: float = 0.05, power: float = 0.8, scale: float = 1.0) -> float:
    """The smallest true change a two-sided level-``alpha`` test detects with probability ``power``.

    For an (approximately) normal estimate with standard error ``se``:
    ``(z_{1 - alpha/2} + z_{power}) * se``. ``scale`` multiplies every sample count (members,
    non-members, candidates): the standard error of a mean-like statistic (AUC, a share) shrinks
    as ``1 / sqrt(scale)``, so the detectable change does too.
    """
    if se < 0 or not 0 < alpha < 1 or not 0 < power < 1 or scale <= 0:
        raise InputError(f"need se >= 0, alpha and power in (0, 1), scale > 0; got {se}, {alpha}, {power}, {scale}")
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * se / math.sqrt(scale)

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

from .metrics import (
    auc,
    auc_replicates,
    check_resamples,
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
        raise ValueError(
            f"before_{name} has {len(b)} scores but after_{name} has {len(a)}; "
            "score the same samples, in the same order, with both models"
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
    raise ValueError(f"unknown statistic {statistic!r}; pass 'auc', 'tpr@<fpr>' such as 'tpr@0.01', or a callable")


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


def _interval_test(
    statistic: str, method: str, before: float, after: float, deltas: np.ndarray, n: dict[str, int]
) -> DeltaTest:
    """A DeltaTest from the point values and the bootstrap replicates of the difference."""
    low, high = np.percentile(deltas, [2.5, 97.5])
    se = float(deltas.std(ddof=1)) if len(deltas) > 1 else 0.0
    return DeltaTest(
        statistic, method, before, after, after - before, float(low), float(high), se, _bootstrap_p(deltas), n, len(deltas)
    )


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
        raise ValueError(
            f"DeLong's test needs at least 2 members and 2 non-members, got {len(bm)} and {len(bn)}; score more samples"
        )
    auc_b, v10_b, v01_b = _delong_components(bm, bn)
    auc_a, v10_a, v01_a = _delong_components(am, an)
    delta = auc_a - auc_b
    se = math.sqrt(np.var(v10_a - v10_b, ddof=1) / len(bm) + np.var(v01_a - v01_b, ddof=1) / len(bn))
    z = delta / se if se > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
    return DeltaTest(
        "auc", "DeLong", auc_b, auc_a, delta, delta - _Z975 * se, delta + _Z975 * se, se,
        math.erfc(abs(z) / math.sqrt(2)), {"members": len(bm), "nonmembers": len(bn)},
    )  # fmt: skip


def _hits(values, name: str) -> np.ndarray:
    """Validated per-candidate hits: training-image index, or -1 for no extraction."""
    x = np.asarray(values)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array with one entry per generated candidate")
    if not np.issubdtype(x.dtype, np.integer) or (x < -1).any():
        raise ValueError(f"{name} must hold integer training-image indices, or -1 where a candidate extracted nothing")
    return x


def distinct_extracted(hits) -> int:
    """Number of distinct training images among per-candidate hits (-1 = none).

    Raises:
        ValueError: ``hits`` is empty, not 1-D, or not integers >= -1.
    """
    hits = _hits(hits, "hits")
    return len(np.unique(hits[hits >= 0]))


def _shares(hits: np.ndarray) -> np.ndarray:
    """Each candidate's share of the distinct count: 1/(hits of its image), 0 for a miss.

    Summing the shares gives the distinct count; bootstrapping the shares is the
    linearised (influence-function) bootstrap of it.
    """
    found = hits >= 0
    _, inverse, counts = np.unique(hits[found], return_inverse=True, return_counts=True)
    shares = np.zeros(len(hits))
    shares[found] = 1.0 / counts[inverse]
    return shares


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
        raise ValueError(
            f"before has {len(before)} candidates but after has {len(after)}; "
            "extraction counts are only comparable at equal candidate counts, so generate as many with both models"
        )
    resamples = check_resamples(resamples)
    share_b, share_a = _shares(before), _shares(after)
    rng = np.random.default_rng(seed)
    c = len(before)
    deltas = np.concatenate(
        [share_a[idx_a].sum(1) - share_b[idx_b].sum(1) for idx_b, idx_a in resample_indices(rng, (c, c), resamples)]
    )
    return _interval_test(
        "distinct_extracted", "independent bootstrap of candidate shares",
        float(distinct_extracted(before)), float(distinct_extracted(after)), deltas, {"candidates": c},
    )  # fmt: skip

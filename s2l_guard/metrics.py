"""Pure metric functions: image distances, bootstrap intervals, membership-inference metrics.

Tiled normalized L2 follows Carlini et al., "Extracting Training Data from
Diffusion Models" (USENIX Security 2023, sec. 4.2): split both images into a
``grid x grid`` array of tiles, take the root mean squared difference of [0, 1]
pixels in each tile, and keep the largest. ``grid = 1`` is the plain
normalized L2 distance.

Membership-inference metrics follow Carlini et al., "Membership Inference
Attacks From First Principles" (IEEE S&P 2022): ROC AUC and the true-positive
rate at a low false-positive rate. Convention throughout: a score is "higher =
more likely a member" (negate losses first), members are label 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score, roc_curve

from .errors import InputError, SettingsError


def _tiles(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, grid*grid, C*(H/grid)*(W/grid)]``."""
    n, c, h, w = x.shape
    if h % grid or w % grid:
        raise SettingsError(f"a {grid}x{grid} tile grid does not divide {h}x{w} images; pick a grid that divides the size")
    x = x.reshape(n, c, grid, h // grid, grid, w // grid).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, grid * grid, c * (h // grid) * (w // grid))


def tiled_l2(a: torch.Tensor, b: torch.Tensor, *, grid: int = 1) -> torch.Tensor:
    """Pairwise tiled normalized L2 ``[N, M]`` between image batches in [0, 1]."""
    # [tiles, N, pixels]: one torch.cdist per tile, batched. Float64 keeps the distances of
    # near-identical images (the ones extraction is about) from cancelling to noise.
    ta, tb = _tiles(a.double(), grid).transpose(0, 1), _tiles(b.double(), grid).transpose(0, 1)
    d = torch.cdist(ta, tb)
    return ((d[0] if grid == 1 else d.amax(0)) / ta.shape[-1] ** 0.5).float()


def distance_chunks(queries: torch.Tensor, references: torch.Tensor, *, grid: int = 1, chunk: int = 1024) -> Iterator[torch.Tensor]:
    """Tiled L2 from ``chunk`` queries at a time to every reference: memory stays bounded by
    ``chunk x len(references)`` distances."""
    for i in range(0, len(queries), chunk):
        yield tiled_l2(queries[i : i + chunk], references, grid=grid)


def nearest(queries: torch.Tensor, references: torch.Tensor, *, grid: int = 1, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query image, the distance to and index of its nearest reference image."""
    if len(references) == 0:
        raise InputError("no reference images to compare with")
    best = [d.min(1) for d in distance_chunks(queries, references, grid=grid, chunk=chunk)]
    if not best:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])


def pairwise(queries: torch.Tensor, references: torch.Tensor, *, grid: int = 1, chunk: int = 1024) -> torch.Tensor:
    """Every query-reference distance ``[N, M]``, computed ``chunk`` queries at a time."""
    parts = list(distance_chunks(queries, references, grid=grid, chunk=chunk))
    return torch.cat(parts) if parts else torch.empty(0, len(references))


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile-bootstrap 95% interval and its sample count."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n}


def bootstrap(statistic: Callable[..., float], *samples: np.ndarray, resamples: int = 1000, seed: int = 0) -> Estimate:
    """Percentile bootstrap of ``statistic(*samples)``; each sample is resampled independently."""
    samples = tuple(np.asarray(s, dtype=float) for s in samples)
    rng = np.random.default_rng(seed)
    values = [statistic(*(s[rng.integers(0, len(s), len(s))] for s in samples)) for _ in range(resamples)]
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return Estimate(float(statistic(*samples)), float(low), float(high), sum(len(s) for s in samples))


def bootstrap_mean(sample: np.ndarray, *, resamples: int = 1000, seed: int = 0) -> Estimate:
    """:func:`bootstrap` of the mean, vectorised: the same draws from the same generator (one
    ``(resamples, n)`` block instead of ``resamples`` rows), so the same interval, about 100x faster."""
    x = np.asarray(sample, dtype=float)
    rng = np.random.default_rng(seed)
    values = x[rng.integers(0, len(x), (resamples, len(x)))].mean(1)
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return Estimate(float(x.mean()), float(low), float(high), len(x))


# --- membership inference -------------------------------------------------------------------

# Largest index array one bootstrap chunk may hold: bounds memory at ~32 MiB of int64
# whatever the sample sizes, while keeping each chunk large enough to vectorise.
_CHUNK_ELEMENTS = 1 << 22


def scores_array(values, name: str) -> np.ndarray:
    """``values`` as a 1-D float array of finite scores.

    Raises:
        ValueError: ``values`` is not 1-D, is empty, or holds NaN or infinite scores.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise InputError(f"{name} has shape {x.shape}; pass a 1-D array with one score per sample")
    if len(x) == 0:
        raise InputError(f"{name} is empty; pass at least one score")
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise InputError(f"{name} holds {bad} NaN or infinite scores; fix or drop those samples before computing metrics")
    return x


def check_fpr(fpr: float) -> float:
    """``fpr`` as a float strictly between 0 and 1.

    Raises:
        ValueError: ``fpr`` is outside (0, 1).
    """
    fpr = float(fpr)
    if not 0 < fpr < 1:
        raise SettingsError(f"target false-positive rate {fpr} is outside (0, 1); pass e.g. 0.01 for 1%")
    return fpr


def check_resamples(resamples: int) -> int:
    """``resamples`` as a positive int.

    Raises:
        ValueError: ``resamples`` is below 1.
    """
    if int(resamples) < 1:
        raise SettingsError(f"resamples={resamples} is below 1; pass a positive number of bootstrap resamples (e.g. 1000)")
    return int(resamples)


def _labelled(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (members 1) and scores of the pooled sample, the layout scikit-learn expects."""
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    return labels, np.r_[member_scores, nonmember_scores]


def auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of a membership score (``sklearn.metrics.roc_auc_score``).

    Equals the Mann-Whitney probability that a random member outscores a random
    non-member, ties counting one half.

    Args:
        member_scores: one score per member, higher = more likely a member.
        nonmember_scores: one score per non-member.

    Returns:
        The AUC in [0, 1]; 0.5 is chance.

    Raises:
        ValueError: an input is empty, not 1-D, or holds NaN or infinite scores.
    """
    members = scores_array(member_scores, "member_scores")
    nonmembers = scores_array(nonmember_scores, "nonmember_scores")
    return float(roc_auc_score(*_labelled(members, nonmembers)))


def rate_with_interval(hits: int, n: int) -> dict:
    """A proportion with its Wilson 95% interval (``scipy.stats.binomtest``) and the count behind it."""
    ci = binomtest(hits, n).proportion_ci(method="wilson") if n else None
    return {"rate": hits / n if n else None, "ci95": [ci.low, ci.high] if ci else None, "n": n}


def tpr_at_fpr(member_scores, nonmember_scores, fpr: float) -> float:
    """True-positive rate at a target false-positive rate (Carlini et al. 2022, "LiRA").

    The largest TPR among the ROC points (``sklearn.metrics.roc_curve``) whose FPR
    is at most ``fpr``. Equivalently: flag a sample when its score exceeds the
    ``k+1``-th largest non-member score, ``k`` the most false positives ``fpr``
    allows. With ``n`` non-members a target below ``1/n`` allows no false
    positive at all, so it cannot be told apart from a target of 0.

    Args:
        member_scores: one score per member, higher = more likely a member.
        nonmember_scores: one score per non-member.
        fpr: target false-positive rate in (0, 1).

    Returns:
        The TPR in [0, 1].

    Raises:
        ValueError: an input is empty or holds NaN/infinite scores, or ``fpr`` is outside (0, 1).
    """
    members = scores_array(member_scores, "member_scores")
    nonmembers = scores_array(nonmember_scores, "nonmember_scores")
    fpr = check_fpr(fpr)
    # Keep every point: dropping "intermediate" collinear points can remove the
    # vertex with the largest TPR below the target when scores are tied.
    fprs, tprs, _ = roc_curve(*_labelled(members, nonmembers), drop_intermediate=False)
    return float(tprs[fprs <= fpr].max())


def resample_indices(rng: np.random.Generator, sizes: Sequence[int], resamples: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Bootstrap indices, one ``[rows, size]`` array per sample, in chunks of replicates.

    Each chunk draws its index arrays in the order of ``sizes`` from ``rng``, so two
    consumers that pass the same generator state see the same replicates
    (this is what keeps the vectorised and the callable statistics identical).

    Args:
        rng: the generator to draw from.
        sizes: the length of each sample; each is resampled with replacement.
        resamples: total number of replicates over all chunks.

    Returns:
        An iterator of tuples, one index array per sample, ``rows`` replicates each.
    """
    rows = max(1, _CHUNK_ELEMENTS // max(1, sum(sizes)))
    for start in range(0, resamples, rows):
        count = min(rows, resamples - start)
        yield tuple(rng.integers(0, size, (count, size)) for size in sizes)


def index_counts(indices: np.ndarray, size: int) -> np.ndarray:
    """``[rows, size]`` times each sample was drawn, from ``[rows, draws]`` bootstrap indices."""
    rows = len(indices)
    flat = (indices + size * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * size).reshape(rows, size).astype(float)


def auc_replicates(members: np.ndarray, nonmembers: np.ndarray, member_counts: np.ndarray, nonmember_counts: np.ndarray) -> np.ndarray:
    """AUC of many weighted resamples at once.

    Row ``r`` is the AUC of the sample in which member ``i`` appears
    ``member_counts[r, i]`` times and non-member ``j`` appears
    ``nonmember_counts[r, j]`` times; it equals ``roc_auc_score`` with those
    counts as ``sample_weight``. Costs O(rows x (members + non-members)) after one sort.

    Args:
        members, nonmembers: finite 1-D score arrays.
        member_counts: ``[rows, len(members)]`` non-negative weights.
        nonmember_counts: ``[rows, len(nonmembers)]`` non-negative weights.

    Returns:
        ``[rows]`` AUCs.
    """
    order = np.argsort(nonmembers, kind="stable")
    ranked = nonmembers[order]
    below = np.searchsorted(ranked, members, "left")  # non-members strictly below each member
    up_to = np.searchsorted(ranked, members, "right")  # ... at or below it
    cum = np.concatenate([np.zeros((len(nonmember_counts), 1)), np.cumsum(nonmember_counts[:, order], axis=1)], axis=1)
    # Weighted non-members each member beats, ties counting one half (Mann-Whitney).
    beaten = cum[:, below] + 0.5 * (cum[:, up_to] - cum[:, below])
    return (member_counts * beaten).sum(1) / (member_counts.sum(1) * nonmember_counts.sum(1))


def tpr_at_fpr_replicates(
    members: np.ndarray, nonmembers: np.ndarray, member_counts: np.ndarray, nonmember_counts: np.ndarray, fpr: float
) -> np.ndarray:
    """:func:`tpr_at_fpr` of many weighted resamples at once.

    Args:
        members, nonmembers, member_counts, nonmember_counts: as in :func:`auc_replicates`.
        fpr: target false-positive rate in (0, 1).

    Returns:
        ``[rows]`` TPRs, each equal to ``tpr_at_fpr`` of ``roc_curve`` with the
        row's counts as ``sample_weight``.
    """
    order = np.argsort(-nonmembers, kind="stable")
    ranked = nonmembers[order]  # descending
    cum = np.cumsum(nonmember_counts[:, order], axis=1)
    # The first non-member (from the top) whose inclusion pushes the FPR past the
    # target: flagging anything at or below its score costs too many false positives.
    # The same float comparison as roc_curve's ``fps / fps[-1] <= fpr``.
    first_over = np.argmax(cum / cum[:, -1:] > fpr, axis=1)
    cutoff = ranked[first_over]
    m_order = np.argsort(members, kind="stable")
    m_cum = np.concatenate([np.zeros((len(member_counts), 1)), np.cumsum(member_counts[:, m_order], axis=1)], axis=1)
    not_above = m_cum[np.arange(len(m_cum)), np.searchsorted(members[m_order], cutoff, "right")]
    # (total - not_above) / total rather than 1 - ratio: exact for integer counts, like roc_curve.
    return (m_cum[:, -1] - not_above) / m_cum[:, -1]


def _percentile_estimate(value: float, replicates: np.ndarray, n: int) -> Estimate:
    """An Estimate with the 95% percentile interval of ``replicates``."""
    low, high = np.percentile(replicates, [2.5, 97.5])
    return Estimate(float(value), float(low), float(high), n)


def roc_metrics(member_scores, nonmember_scores, *, fprs: Sequence[float] = (0.01, 0.001), resamples: int = 1000, seed: int = 0) -> dict:
    """ROC AUC and TPR at low FPRs with stratified percentile-bootstrap 95% intervals.

    Point estimates come from scikit-learn (:func:`auc`, :func:`tpr_at_fpr`).
    Intervals: members and non-members are resampled independently (stratified,
    so every replicate keeps the original class sizes), ``resamples`` times from
    ``numpy.random.default_rng(seed)``; all statistics share the replicates.

    With ``n`` non-members the smallest non-zero FPR is ``1/n``: a target below it
    cannot be resolved (it allows no false positive, like a target of 0). Such
    targets are still estimated, but ``resolvable[fpr]`` is False and the number
    should not be reported as "TPR at that FPR" (Carlini et al. 2022 use tens of
    thousands of non-members for 0.1%).

    Args:
        member_scores: one score per member, higher = more likely a member.
        nonmember_scores: one score per non-member.
        fprs: target false-positive rates, each in (0, 1).
        resamples: bootstrap replicates.
        seed: seed of the bootstrap.

    Returns:
        ``{"auc": Estimate, "tpr_at_fpr": {fpr: Estimate}, "resolvable": {fpr: bool},
        "n_members": int, "n_nonmembers": int, "resamples": int}``; each Estimate's
        ``n`` is the total sample count. :func:`metrics_to_dict` makes it JSON-ready.

    Raises:
        ValueError: an input is empty or holds NaN/infinite scores, a target is
            outside (0, 1), or ``resamples`` is below 1.
    """
    members = scores_array(member_scores, "member_scores")
    nonmembers = scores_array(nonmember_scores, "nonmember_scores")
    targets = [check_fpr(f) for f in fprs]
    resamples = check_resamples(resamples)
    rng = np.random.default_rng(seed)
    aucs, tprs = [], {f: [] for f in targets}
    for idx_m, idx_n in resample_indices(rng, (len(members), len(nonmembers)), resamples):
        counts_m, counts_n = index_counts(idx_m, len(members)), index_counts(idx_n, len(nonmembers))
        aucs.append(auc_replicates(members, nonmembers, counts_m, counts_n))
        for f in targets:
            tprs[f].append(tpr_at_fpr_replicates(members, nonmembers, counts_m, counts_n, f))
    n = len(members) + len(nonmembers)
    return {
        "auc": _percentile_estimate(auc(members, nonmembers), np.concatenate(aucs), n),
        "tpr_at_fpr": {f: _percentile_estimate(tpr_at_fpr(members, nonmembers, f), np.concatenate(tprs[f]), n) for f in targets},
        "resolvable": {f: f >= 1 / len(nonmembers) for f in targets},
        "n_members": len(members),
        "n_nonmembers": len(nonmembers),
        "resamples": resamples,
    }


def metrics_to_dict(result):
    """A JSON-ready copy of a :func:`roc_metrics` or :func:`threshold_protocol` result.

    Estimates become ``{"value", "ci95", "n"}``, dict keys become strings
    (``0.01`` -> ``"0.01"``); everything else is kept.
    """
    if isinstance(result, Estimate):
        return result.to_dict()
    if isinstance(result, dict):
        return {str(k): metrics_to_dict(v) for k, v in result.items()}
    return result


def calibration_count(n: int, calibration_share: float) -> int:
    """How many of ``n`` samples of a class go to calibration: the share rounded, never leaving a part empty."""
    return min(max(int(round(calibration_share * n)), 1), n - 1)


def calibration_split(n_members: int, n_nonmembers: int, *, calibration_share: float = 0.5, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded split of members and of non-members into calibration and test indices.

    Each class is split separately with the same share (stratified), so both
    parts keep the class balance of the input.

    Args:
        n_members, n_nonmembers: sample counts.
        calibration_share: share of each class that goes to calibration, in (0, 1);
            the count is rounded, and kept between 1 and ``n - 1``.
        seed: seed of the split.

    Returns:
        Sorted index arrays ``calibration_members``, ``test_members``,
        ``calibration_nonmembers``, ``test_nonmembers``; the calibration and test
        indices of a class are disjoint and together cover ``range(n)``.

    Raises:
        ValueError: the share is outside (0, 1), or a class has fewer than 2 samples.
    """
    if not 0 < calibration_share < 1:
        raise SettingsError(f"calibration_share={calibration_share} is outside (0, 1); pass e.g. 0.5")
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("members", n_members), ("nonmembers", n_nonmembers)):
        if n < 2:
            raise InputError(f"{n} {name} cannot be split into a calibration and a test part; score at least 2")
        k = calibration_count(n, calibration_share)
        perm = rng.permutation(n)
        out[f"calibration_{name}"], out[f"test_{name}"] = np.sort(perm[:k]), np.sort(perm[k:])
    return out


def fit_threshold(nonmember_scores, fpr: float) -> float:
    """The smallest threshold ``t`` whose rule "member iff score > t" has FPR <= ``fpr`` here.

    That is the ``k+1``-th largest non-member score, ``k`` the most false positives
    the target allows among these non-members (the ROC convention of :func:`tpr_at_fpr`).

    Raises:
        ValueError: the scores are empty or not finite, or ``fpr`` is outside (0, 1).
    """
    nonmembers = np.sort(scores_array(nonmember_scores, "nonmember_scores"))[::-1]
    n = len(nonmembers)
    # Largest k with k/n <= fpr, computed with the same float division as roc_curve.
    allowed = int(np.searchsorted(np.arange(n + 1) / n, check_fpr(fpr), "right")) - 1
    return float(nonmembers[allowed])


def _apply_threshold(threshold: float, members: np.ndarray, nonmembers: np.ndarray, resamples: int, seed: int) -> dict:
    """Achieved TPR and FPR of "member iff score > threshold", with bootstrap intervals."""
    return {
        "threshold": threshold,
        "tpr": bootstrap_mean(members > threshold, resamples=resamples, seed=seed),
        "fpr": bootstrap_mean(nonmembers > threshold, resamples=resamples, seed=seed),
    }


def threshold_protocol(
    member_scores,
    nonmember_scores,
    *,
    fprs: Sequence[float] = (0.01, 0.001),
    calibration_share: float = 0.5,
    seed: int = 0,
    resamples: int = 1000,
) -> dict:
    """Thresholds fitted on a calibration split, judged on a disjoint test split.

    The protocol (the eval -> test split of CopyMark, Ma et al. 2024, and the
    "thresholds from held-out data" of Carlini et al. 2022):

    1. split members and non-members each, seeded and stratified, into a
       calibration part and a disjoint test part (:func:`calibration_split`);
    2. for each target FPR fit the threshold on the calibration non-members
       only (:func:`fit_threshold`; rule: member iff score > threshold);
    3. report the TPR and FPR that threshold achieves on the test part, each
       with a percentile-bootstrap 95% interval over the test samples of that
       class (conditional on the threshold: calibration noise is not in it, the
       gap between achieved and target FPR shows it) and the sample count.

    The same quantities with the threshold fitted on the test non-members
    themselves are reported under ``optimistic_fit_on_test``: choosing the
    threshold on the data it is judged on guarantees FPR <= target and so
    overstates what an attacker achieves on new samples. Its TPR equals
    :func:`tpr_at_fpr` on the test part.

    A target is ``resolvable`` only when it is at least ``1/n`` for the
    non-members of both the calibration and the test part.

    Args:
        member_scores: one score per member, higher = more likely a member.
        nonmember_scores: one score per non-member.
        fprs: target false-positive rates, each in (0, 1).
        calibration_share: share of each class used for calibration, in (0, 1).
        seed: seed of the split and of the bootstrap.
        resamples: bootstrap replicates.

    Returns:
        ``{"split": {"calibration": {"members", "nonmembers"}, "test": {...},
        "calibration_share", "seed"}, "fit_on_calibration": {fpr: {"threshold",
        "calibration_fpr", "tpr": Estimate, "fpr": Estimate, "resolvable"}},
        "optimistic_fit_on_test": {fpr: {"threshold", "tpr", "fpr", "resolvable"}}}``.
        :func:`metrics_to_dict` makes it JSON-ready.

    Raises:
        ValueError: an input is empty or not finite, a target or the share is out
            of range, a class is too small to split, or ``resamples`` is below 1.
    """
    members = scores_array(member_scores, "member_scores")
    nonmembers = scores_array(nonmember_scores, "nonmember_scores")
    targets = [check_fpr(f) for f in fprs]
    resamples = check_resamples(resamples)
    split = calibration_split(len(members), len(nonmembers), calibration_share=calibration_share, seed=seed)
    cal_n = nonmembers[split["calibration_nonmembers"]]
    test_m, test_n = members[split["test_members"]], nonmembers[split["test_nonmembers"]]
    fitted, optimistic = {}, {}
    for f in targets:
        threshold = fit_threshold(cal_n, f)
        resolvable = f >= 1 / min(len(cal_n), len(test_n))
        fitted[f] = {
            **_apply_threshold(threshold, test_m, test_n, resamples, seed),
            "calibration_fpr": float(np.mean(cal_n > threshold)),
            "resolvable": resolvable,
        }
        optimistic[f] = {**_apply_threshold(fit_threshold(test_n, f), test_m, test_n, resamples, seed), "resolvable": resolvable}
    return {
        "split": {
            "calibration": {"members": len(split["calibration_members"]), "nonmembers": len(cal_n)},
            "test": {"members": len(test_m), "nonmembers": len(test_n)},
            "calibration_share": calibration_share,
            "seed": seed,
        },
        "fit_on_calibration": fitted,
        "optimistic_fit_on_test": optimistic,
    }

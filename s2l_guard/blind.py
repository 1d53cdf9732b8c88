"""Blind baseline: can members be told from non-members without the model?

A membership-inference attack is only evidence of leakage when members and
non-members come from the same distribution. When they do not - the
non-members were collected later, resized differently, drawn from another
source - any score that tracks the difference separates them, the model's loss
included, and the attack's AUC measures the split rather than the model. Das,
Zhang and Tramer ("Blind Baselines Beat Membership Inference Attacks for
Foundation Models", arXiv 2406.16201, 2024) show that on most published
member/non-member benchmarks a classifier that never sees the model beats the
attacks; CopyMark makes the same point for diffusion models (SecMI on Stable
Diffusion v1.5: AUC 0.725 on a shifted split, 0.52 on an i.i.d. one).

:func:`blind_baseline` is that classifier for image splits. It computes
cheap features from the images alone (:func:`image_features`: the pixels,
area-downsampled to at most 16x16, and a few global statistics), scores every
image with a scaled logistic regression that did not train on it (stratified
K-fold, ``cross_val_predict``), and reports the ROC AUC of those out-of-fold
scores with the percentile-bootstrap 95% interval of
:func:`s2l_guard.metrics.roc_metrics`, the membership attacks' own convention.
:attr:`BlindResult.fires` when the interval's lower end exceeds ``0.5 +
margin``: the split is shifted, and no MIA on it can be trusted until the
non-members are rebuilt from the members' distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from .errors import InputError, SettingsError
from .metrics import check_resamples, roc_metrics

MAX_SIDE = 16  # pixel features: images are area-downsampled to at most MAX_SIDE x MAX_SIDE
STATISTICS = ("mean", "std", "ink", "gradient_energy", "edge_density", "laplacian_var")
INK = 0.5  # a pixel above this (on the channel mean) is ink
EDGE = 0.25  # a gradient magnitude above this is an edge
C = 0.1  # inverse L2 strength of the logistic regression: tens of images, tens to hundreds of features


def _as_array(images, name: str) -> np.ndarray:
    """``images`` as a finite float64 array ``[N, C, H, W]``.

    Raises:
        InputError: not 4-D, empty, or holding NaN or infinite values.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise InputError(f"{name} has shape {tuple(x.shape)}; pass images as [N, C, H, W] in [0, 1] (ImageDataset.images)")
    if len(x) == 0:
        raise InputError(f"{name} holds no image; pass at least one")
    bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum())
    if bad:
        raise InputError(f"{name} has {bad} images with NaN or infinite pixels; fix or drop them first")
    return x


def image_features(images) -> np.ndarray:
    """Features of each image computed from the image alone (no model).

    The pixels, area-downsampled to at most 16x16 per channel and flattened,
    followed by six statistics of the channel-mean image: mean intensity,
    standard deviation, ink share (pixels above 0.5), gradient energy (mean
    squared finite difference), edge density (share of pixels whose gradient
    magnitude exceeds 0.25) and the variance of the Laplacian (a blur measure:
    blurring lowers it).

    Args:
        images: ``[N, C, H, W]`` tensor or array in [0, 1], as ``ImageDataset.images``.

    Returns:
        A float64 array ``[N, C * h * w + 6]`` with ``h, w = min(H, 16), min(W, 16)``.

    Raises:
        InputError: ``images`` is not 4-D, empty, or holds NaN or infinite values.
    """
    x = _as_array(images, "images")
    n, _, h, w = x.shape
    small = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), (min(h, MAX_SIDE), min(w, MAX_SIDE))).numpy()
    grey = x.mean(1)
    gx = np.diff(grey, axis=2, append=grey[:, :, -1:])  # forward differences, zero at the far edge
    gy = np.diff(grey, axis=1, append=grey[:, -1:, :])
    magnitude = np.sqrt(gx**2 + gy**2)
    padded = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    laplacian = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:] - 4 * grey
    flat = grey.reshape(n, -1)
    stats = np.stack(
        [
            flat.mean(1),
            flat.std(1),
            (flat > INK).mean(1),
            (gx**2 + gy**2).reshape(n, -1).mean(1),
            (magnitude > EDGE).reshape(n, -1).mean(1),
            laplacian.reshape(n, -1).var(1),
        ],
        axis=1,
    )
    return np.concatenate([small.reshape(n, -1), stats], axis=1)


@dataclass(frozen=True)
class BlindResult:
    """The blind baseline's verdict on a member/non-member split.

    Attributes:
        auc: ROC AUC of the out-of-fold member scores (0.5: the images alone do not separate the sets).
        ci95: its stratified percentile-bootstrap 95% interval ``(low, high)``.
        members: member images scored.
        nonmembers: non-member images scored.
        folds: cross-validation folds.
        resamples: bootstrap resamples of the interval.
        method: how the scores were obtained, in words.
        margin: how far above 0.5 the interval's lower end must lie to fire.
        seed: seed of the folds and of the bootstrap.
    """

    auc: float
    ci95: tuple[float, float]
    members: int
    nonmembers: int
    folds: int
    resamples: int
    method: str
    margin: float
    seed: int = 0

    @property
    def fires(self) -> bool:
        """True when the lower end of the AUC interval exceeds ``0.5 + margin``: the split is shifted."""
        return self.ci95[0] > 0.5 + self.margin

    def message(self) -> str:
        """The one line a gate reports when the baseline fires."""
        low, high = self.ci95
        return (
            f"members and non-members differ without the model (blind AUC {self.auc:.2f} [95% CI {low:.2f}, {high:.2f}], "
            f"{self.members} members vs {self.nonmembers} non-members, {self.folds}-fold cross-validated); "
            "rebuild the non-members from the members' distribution"
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict (``ci95`` as a list, ``fires`` included for readers; :meth:`from_dict` ignores it)."""
        out = asdict(self)
        out["ci95"] = [float(self.ci95[0]), float(self.ci95[1])]
        out["fires"] = self.fires
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "BlindResult":
        """The result :meth:`to_dict` wrote.

        Raises:
            InputError: a field is missing.
        """
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n != "seed"]
        if missing:
            raise InputError(f"blind-baseline dict lacks {', '.join(missing)}; pass what BlindResult.to_dict() wrote")
        kept = {n: data[n] for n in names if n in data}
        low, high = kept["ci95"]
        kept["ci95"] = (float(low), float(high))
        return cls(**kept)


def blind_baseline(members, nonmembers, *, folds: int = 5, resamples: int = 1000, seed: int = 0, margin: float = 0.05) -> BlindResult:
    """Tell members from non-members from the images alone, cross-validated.

    Each image's member score is the probability a ``StandardScaler +
    LogisticRegression(C=0.1)`` pipeline on :func:`image_features` assigns to
    "member", from the fold model that did not train on it (stratified K-fold,
    shuffled with ``seed``, ``sklearn.model_selection.cross_val_predict``). The
    AUC and its interval are :func:`s2l_guard.metrics.roc_metrics` of those scores.

    Args:
        members: member images ``[N, C, H, W]`` in [0, 1] (tensor or array).
        nonmembers: non-member images ``[M, C, H, W]``, same ``C, H, W``.
        folds: stratified cross-validation folds (at least 2, at most the smaller class's size).
        resamples: bootstrap resamples of the AUC interval.
        seed: seed of the fold split and of the bootstrap; equal seeds give equal results.
        margin: the baseline fires when the interval's lower end exceeds ``0.5 + margin``.

    Returns:
        A :class:`BlindResult`.

    Raises:
        InputError: an input is not 4-D, empty or non-finite, the two disagree on
            ``C, H, W``, or a class has fewer images than ``folds``.
        SettingsError: ``folds`` below 2, ``resamples`` below 1, or ``margin`` outside [0, 0.5).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if isinstance(folds, bool) or int(folds) != folds or folds < 2:
        raise SettingsError(f"folds={folds} is not a whole number >= 2; pass e.g. 5")
    folds = int(folds)
    resamples = check_resamples(resamples)
    if not 0 <= margin < 0.5:
        raise SettingsError(f"margin={margin} is outside [0, 0.5); pass e.g. 0.05")
    m = _as_array(members, "members")
    n = _as_array(nonmembers, "nonmembers")
    if m.shape[1:] != n.shape[1:]:
        raise InputError(f"members are {m.shape[1:]} (C, H, W) but non-members {n.shape[1:]}; bring both to one size and channel count first")
    if min(len(m), len(n)) < folds:
        raise InputError(
            f"{len(m)} members and {len(n)} non-members are too few for {folds}-fold cross-validation; give each {folds} or more, or lower folds"
        )
    x = image_features(np.concatenate([m, n]))
    y = np.r_[np.ones(len(m), dtype=int), np.zeros(len(n), dtype=int)]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x, y, cv=split, method="predict_proba")[:, 1]
    roc = roc_metrics(scores[: len(m)], scores[len(m) :], fprs=(), resamples=resamples, seed=seed)
    method = (
        f"StandardScaler + LogisticRegression(C={C}) on {x.shape[1]} image features ({x.shape[1] - len(STATISTICS)} pixels, "
        f"{len(STATISTICS)} statistics), out-of-fold scores of stratified {folds}-fold cross-validation (seed {seed}); "
        f"AUC interval: stratified percentile bootstrap, {resamples} resamples"
    )
    estimate = roc["auc"]
    return BlindResult(
        auc=estimate.value,
        ci95=(estimate.low, estimate.high),
        members=len(m),
        nonmembers=len(n),
        folds=folds,
        resamples=resamples,
        method=method,
        margin=float(margin),
        seed=int(seed),
    )

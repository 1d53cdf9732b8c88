"""Empirical privacy: the smallest epsilon a training run could have, given how well an MIA did.

An (epsilon, delta)-DP training run bounds every membership test: TPR <= e^eps FPR + delta
and TNR <= e^eps FNR + delta (Kairouz et al. 2015). So a threshold on an MIA's scores whose
TPR and FPR are known with confidence implies epsilon >= log((TPR - delta) / FPR) and
epsilon >= log((TNR - delta) / FNR) (Jagielski et al., NeurIPS 2020; Nasr et al., S&P 2021).
The threshold is chosen on a calibration split and judged on the disjoint test split, with
Clopper-Pearson intervals, so the bound holds with the stated confidence rather than being
the best of many looks at the same samples.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest

from .errors import SettingsError
from .metrics import calibration_split, scores_array


def _exact_interval(hits: int, n: int, confidence: float) -> tuple[float, float]:
    ci = binomtest(hits, n).proportion_ci(confidence_level=confidence, method="exact")
    return ci.low, ci.high


def _bound(tpr: float, fpr: float, delta: float) -> float:
    """The epsilon the rates imply: the larger of the two DP inequalities' bounds, at least 0."""
    bounds = [0.0]
    if fpr > 0 and tpr - delta > 0:
        bounds.append(math.log((tpr - delta) / fpr))
    if tpr < 1 and 1 - fpr - delta > 0:
        bounds.append(math.log((1 - fpr - delta) / (1 - tpr)))
    return max(bounds)


def epsilon_lower_bound(member_scores, nonmember_scores, *, delta: float, confidence: float = 0.95, calibration_share: float = 0.5,
                        seed: int = 0) -> dict:  # fmt: skip
    """A lower bound on the epsilon of the training run that produced these MIA scores.

    Args:
        member_scores, nonmember_scores: one score per member / held-out non-member, higher = member.
        delta: the run's delta (the DP inequalities' additive slack), in [0, 1).
        confidence: the probability that the bound holds; split evenly between the two rates'
            one-sided Clopper-Pearson bounds.
        calibration_share, seed: the split on which the threshold is chosen.

    Returns:
        ``{"epsilon": bound, "threshold", "tpr": [low, point], "fpr": [point, high], "test_members",
        "test_nonmembers", "delta", "confidence", "method"}``; ``epsilon`` is 0 when the scores show
        nothing a DP run of any epsilon could not produce.
    """
    if not 0 <= delta < 1:
        raise SettingsError(f"delta must be in [0, 1), got {delta}")
    if not 0 < confidence < 1:
        raise SettingsError(f"confidence must be in (0, 1), got {confidence}; use e.g. 0.95")
    members = scores_array(member_scores, "member_scores")
    nonmembers = scores_array(nonmember_scores, "nonmember_scores")
    split = calibration_split(len(members), len(nonmembers), calibration_share=calibration_share, seed=seed)
    cal_m, cal_n = members[split["calibration_members"]], nonmembers[split["calibration_nonmembers"]]
    test_m, test_n = members[split["test_members"]], nonmembers[split["test_nonmembers"]]

    # The threshold with the largest bound on the calibration split (rates smoothed by half a
    # count, so that no threshold wins by a zero in the calibration sample alone).
    def smoothed(threshold: float) -> float:
        tpr = ((cal_m >= threshold).sum() + 0.5) / (len(cal_m) + 1)
        fpr = ((cal_n >= threshold).sum() + 0.5) / (len(cal_n) + 1)
        return _bound(tpr, fpr, delta)

    threshold = max(np.unique(np.concatenate([cal_m, cal_n])), key=smoothed)
    # Each rate's one-sided bound at (1 - confidence) / 2, from a two-sided interval of level 2 confidence - 1.
    level = 2 * confidence - 1
    tp, fp = int((test_m >= threshold).sum()), int((test_n >= threshold).sum())
    tpr_low = _exact_interval(tp, len(test_m), level)[0]
    fpr_high = _exact_interval(fp, len(test_n), level)[1]
    return {
        "epsilon": _bound(tpr_low, fpr_high, delta),
        "threshold": float(threshold),
        "tpr": [tpr_low, tp / len(test_m)],
        "fpr": [fp / len(test_n), fpr_high],
        "test_members": len(test_m),
        "test_nonmembers": len(test_n),
        "delta": delta,
        "confidence": confidence,
        "method": f"threshold chosen on a {calibration_share:g} calibration split; TPR lower and FPR upper Clopper-Pearson "
        f"bounds on the test split, {confidence:g} jointly; epsilon >= max(log((TPR - delta) / FPR), log((TNR - delta) / FNR))",
    }

"""The empirical epsilon lower bound: valid under DP, tight on a mechanism of known epsilon, loud on a leak."""

import math

import numpy as np
import pytest

from s2l_guard.audit import epsilon_lower_bound
from s2l_guard.errors import ConfigError


def randomized_response(epsilon: float, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the epsilon-DP mechanism that reports membership truthfully with probability e^eps / (1 + e^eps)."""
    truth = math.exp(epsilon) / (1 + math.exp(epsilon))
    return (rng.random(n) < truth).astype(float), (rng.random(n) >= truth).astype(float)


def test_bound_is_valid_and_nearly_tight_on_a_mechanism_of_known_epsilon():
    m, n = randomized_response(1.0, 20_000, np.random.default_rng(0))
    bound = epsilon_lower_bound(m, n, delta=0.0)
    assert 0.9 < bound["epsilon"] <= 1.0  # never above the truth, and close to it at this size


def test_a_run_without_privacy_is_caught_far_above_a_small_claim():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(3, 1, 400), rng.normal(0, 1, 400)  # a strong leak
    bound = epsilon_lower_bound(members, nonmembers, delta=1e-5)
    assert bound["epsilon"] > 2.0 and bound["tpr"][0] <= bound["tpr"][1] and bound["fpr"][0] <= bound["fpr"][1]


def test_no_leak_gives_zero_in_at_least_the_stated_share_of_runs():
    zeros = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        zeros += epsilon_lower_bound(rng.normal(size=200), rng.normal(size=200), delta=1e-5, seed=seed)["epsilon"] == 0
    assert zeros >= 54  # the bound is wrong with probability at most 5%: at most 3 of 60 expected


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="delta must be in"):
        epsilon_lower_bound([1.0, 2.0], [0.0, 1.0], delta=1.0)
    with pytest.raises(ConfigError, match="confidence must be in"):
        epsilon_lower_bound([1.0, 2.0], [0.0, 1.0], delta=0.0, confidence=1.0)

"""The one-run canary audit: its p-value and bound on mechanisms of known epsilon, its guessing,
and one audit of a smoke DP run end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from s2l_guard.errors import SettingsError
from s2l_guard.runner.canaries import canary_captions, epsilon_from_guesses, one_run_bound, p_value


def test_p_value_is_the_binomial_tail_without_delta_and_grows_with_delta():
    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert p_value(100, 40, 30, 1.0, 0.0) == pytest.approx(binom.sf(29, 40, q))
    assert p_value(100, 40, 30, 1.0, 1e-3) > p_value(100, 40, 30, 1.0, 0.0)
    assert p_value(100, 40, 0, 1.0, 1e-3) == 1.0  # no right guess is no evidence


def test_all_guesses_right_bound_epsilon_where_their_p_value_is_five_percent():
    q = 20 ** (-1 / 100)  # every guess right has p-value q^100 = 0.05 at this accuracy
    assert epsilon_from_guesses(200, 100, 100, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert epsilon_from_guesses(200, 100, 50, delta=0.0) == 0.0  # chance accuracy proves nothing


def test_the_bound_holds_on_randomized_response_in_at_least_the_stated_share_of_runs():
    """Canaries guessed by an epsilon-DP mechanism (randomized response at epsilon 1): the bound
    may exceed 1 in at most 5% of runs, and comes close to it when every canary is guessed."""
    epsilon, over, bounds = 1.0, 0, []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        truthful = rng.random(1000) < math.exp(epsilon) / (1 + math.exp(epsilon))
        scores = np.where(truthful == included, 1.0, 0.0) + rng.random(1000) * 1e-6  # 1: "in", ties broken at random
        bound = one_run_bound(scores, included, guesses=1000, delta=0.0)["epsilon"]
        over += bound > epsilon
        bounds.append(bound)
    assert over <= 4 and np.median(bounds) > 0.8


def test_a_leak_is_bounded_far_above_a_small_claim_and_bad_counts_are_refused():
    rng = np.random.default_rng(0)
    included = rng.random(200) < 0.5
    scores = included * 3.0 + rng.normal(size=200)  # a strong leak
    bound = one_run_bound(scores, included, guesses=100, delta=1e-5)
    assert bound["epsilon"] > 2.0 and bound["correct"] >= 95 and bound["guesses"] == 100
    with pytest.raises(SettingsError, match="must be even"):
        one_run_bound(scores, included, guesses=300, delta=0.0)
    top = one_run_bound(scores, included, guesses=41, delta=1e-5, sides="in")  # "in" guesses only: any count
    assert top["guesses"] == 41 and top["correct"] == int(included[np.argsort(-scores)[:41]].sum()) and top["epsilon"] > 1.0
    with pytest.raises(SettingsError, match="at least 1"):
        one_run_bound(scores, included, guesses=0, delta=0.0, sides="in")
    with pytest.raises(SettingsError, match="sides"):
        one_run_bound(scores, included, guesses=10, delta=0.0, sides="out")
    with pytest.raises(SettingsError, match="two-letter"):
        canary_captions(1000)
    assert canary_captions(28)[:3] == ["aa", "ab", "ac"] and canary_captions(28)[27] == "bb"


def test_the_broken_dp_control_switches_opacus_noise_off_and_back_on():
    import torch
    from opacus.optimizers import optimizer as dp_optimizer

    from s2l_guard.runner.canaries import noise_switched_off

    with noise_switched_off():
        assert not dp_optimizer._generate_noise(std=1.0, reference=torch.ones(1000)).any()
    assert dp_optimizer._generate_noise(std=1.0, reference=torch.ones(1000)).abs().sum() > 100


@pytest.mark.slow  # five smoke DP trainings (about 40 s)
@pytest.mark.parametrize("defense", ["dp_sgd", "private_finetune"])
def test_the_audit_catches_a_dp_defense_without_noise_and_passes_it_with_noise(tmp_path, monkeypatch, defense):
    from s2l_guard.config import load_config
    from s2l_guard.runner.canaries import audit_defense, format_audit

    monkeypatch.chdir(tmp_path)
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")
    claim = {"target_epsilon": 1.0, "delta": 1e-5}  # a claim one run can refute (the smoke sets are small: 1 / (10 N) is large)
    config = config.replace(run={"store": str(tmp_path / "store")}, defense={"name": defense},
                            defenses={defense: dict(config.defenses.get(defense, {})) | claim})  # fmt: skip
    correct = audit_defense(config, canaries=100, guesses=30)
    broken = audit_defense(config, canaries=100, guesses=30, broken=True)
    for result in (correct, broken):
        assert result["kind"] == "gradient" and result["claimed_epsilon"] == 1.0 and result["guesses"] == 30
        assert result["included"] == correct["included"]  # the same canaries in both runs
    assert not correct["caught"] and "consistent with the claim" in format_audit(correct)
    assert broken["caught"] and broken["correct"] == 30 and "(noise switched off)" in format_audit(broken)
    if defense == "dp_sgd":  # canary images: the black-box kind runs too (too weak to catch the broken run here)
        images = audit_defense(config, kind="image", canaries=32, guesses=16)
        assert images["kind"] == "image" and not images["caught"] and 0 <= images["correct"] <= 16

"""Dirac gradient canaries on a tiny DP run: the audit flags DP with the noise switched off, passes
DP with it on, joins canaries at the rows' sampling rate, and changes nothing else."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from test_privacy import run

from s2l_guard import gradient_canaries
from s2l_guard.errors import S2LError, SettingsError
from s2l_guard.runner.canaries import noise_switched_off, one_run_bound
from s2l_guard.testing import tiny_bundle

pytestmark = pytest.mark.filterwarnings("ignore")
CLAIM, DELTA = 1.0, 1e-6  # a claim one run can refute: 100 right guesses of 100 bound epsilon near 3.4


def audit(included, *, broken: bool, steps: int = 10, mode: str = "hooks"):
    with noise_switched_off() if broken else contextlib.nullcontext(), gradient_canaries.recording(included, seed=3) as canaries:
        result = run(tiny_bundle(), steps=steps, epsilon=CLAIM, names=("unet.",), delta=DELTA, grad_sample_mode=mode)
    return result, canaries


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("broken", [True, False])
def test_the_audit_flags_dp_without_noise_and_passes_dp_with_it(broken, mode):
    included = np.random.default_rng(0).random(400) < 0.5
    result, canaries = audit(included, broken=broken, mode=mode)
    bound = one_run_bound(canaries.scores, included, guesses=100, delta=result.delta, sides="in")
    assert result.epsilon == pytest.approx(CLAIM, abs=0.01)  # the accountant's claim is the same either way
    if broken:
        assert bound["correct"] == 100 and bound["epsilon"] > 3 * CLAIM  # caught, by far
    else:
        assert bound["epsilon"] <= CLAIM and bound["correct"] < 80


def test_included_canaries_join_at_the_rows_rate_and_absent_ones_change_nothing():
    from test_training import snapshot

    included = np.random.default_rng(1).random(300) < 0.5
    result, canaries = audit(included, broken=False, steps=8)
    expected = included.sum() * result.sample_rate * result.steps
    assert canaries.steps == result.steps == 8 and canaries.sample_rate == result.sample_rate
    assert abs(canaries.joined - expected) < 4 * np.sqrt(expected)  # Poisson sampling, like every row

    without, alone = tiny_bundle(), tiny_bundle()
    run(without, steps=3, epsilon=CLAIM, names=("unet.",), delta=DELTA)
    with gradient_canaries.recording(np.zeros(300, dtype=bool), seed=3):  # canaries none of which is in the data set
        run(alone, steps=3, epsilon=CLAIM, names=("unet.",), delta=DELTA)
    before, after = snapshot(without), snapshot(alone)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_recording_without_a_dp_training_or_with_too_many_canaries_is_an_error():
    with pytest.raises(S2LError, match="no DP-SGD training ran"):
        with gradient_canaries.recording(np.ones(10, dtype=bool), seed=0):
            pass
    with pytest.raises(SettingsError, match="use fewer canaries"):
        with gradient_canaries.recording(np.ones(10**6, dtype=bool), seed=0):
            run(tiny_bundle(), steps=1, epsilon=CLAIM, names=("unet.conv_out.",), delta=DELTA)
    assert gradient_canaries._ACTIVE == []  # nothing left behind for the next training

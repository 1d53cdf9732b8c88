"""The utility evaluator: a digits classifier outside the threat model, and FID's distance."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from s2l_guard.errors import S2LError
from s2l_guard.utility import conditional_accuracy, digits_evaluator, frechet_distance


def digits_of(digit: int) -> torch.Tensor:
    digits = load_digits()
    return torch.tensor(digits.images[digits.target == digit] / 16.0, dtype=torch.float32).unsqueeze(1)


def test_real_digits_are_read_as_their_digit_and_noise_is_not():
    evaluator = digits_evaluator()
    assert conditional_accuracy(evaluator, digits_of(7), 7) > 0.95
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert conditional_accuracy(evaluator, noise, 7) < 0.5


def test_testbed_images_read_as_their_digit(tmp_path):
    """The testbed stores the digits as 8-bit PNGs; the evaluator reads them as the raw digits."""
    from pathlib import Path

    from s2l_guard.config import load_config
    from s2l_guard.data import load_imagefolder
    from s2l_guard.testbed import build_testbed

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")
    dataset = load_imagefolder(build_testbed(tmp_path / "digits", config.testbed, seed=0))
    for digit in (0, 7):
        images = dataset.select(domain=f"digit{digit}").images
        assert conditional_accuracy(digits_evaluator(), images, digit) > 0.95


def test_frechet_distance_separates_digits_and_is_near_zero_within_one():
    evaluator = digits_evaluator()
    sevens, ones = evaluator.features(digits_of(7)), evaluator.features(digits_of(1))
    half = len(sevens) // 2
    within = frechet_distance(sevens[:half], sevens[half:])
    across = frechet_distance(sevens, ones)
    assert within < across / 5


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-3, 3), seed=st.integers(0, 1000))
def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift(shift, seed):
    x = np.random.default_rng(seed).normal(size=(200, 3))
    assert frechet_distance(x, x + shift) == pytest.approx(3 * shift**2, abs=1e-6)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs_are_errors():
    evaluator = digits_evaluator()
    with pytest.raises(S2LError, match=r"\[N, 1, 8, 8\]"):
        evaluator.predict(torch.zeros(3, 3, 8, 8))
    with pytest.raises(S2LError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))

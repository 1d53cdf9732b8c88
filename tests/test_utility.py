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


def test_utility_of_any_data_uses_the_models_own_encoder(tmp_path):
    """Photos of cats and dogs have no classifier here: utility is the held-out denoising loss and a
    Frechet distance in the VAE encoder's space, and conditional accuracy is left unmeasured."""
    from s2l_guard.config import load_config
    from s2l_guard.data import Record, load_imagefolder, write_imagefolder
    from s2l_guard.provider import Provider
    from s2l_guard.testing import tiny_latent_bundle
    from s2l_guard.utility import model_features, model_utility

    rng = np.random.default_rng(0)
    records = [
        Record(f"{d}-{m}-{i}.png", f"a photo of {d}", d, m, int(m == "member"))
        for d in ("cat", "dog")
        for m in ("member", "nonmember")
        for i in range(3)
    ]
    dataset = load_imagefolder(write_imagefolder(tmp_path / "data", rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), records))
    bundle = tiny_latent_bundle()
    assert model_features(bundle, dataset.images[:5]).shape == (5, 4 * 8 * 8)  # 4 latent channels, 8x8 latents
    config = load_config("configs/smoke.toml").replace(utility={"samples_per_domain": 3, "sampler_steps": 2}, report={"loss_timesteps": [10, 40]})
    utility = model_utility(Provider(bundle, "open-weights"), bundle, dataset, config, seed=0)
    assert utility["status"] == "ok" and utility["evaluator"] is None and utility["conditional_accuracy_mean"] is None
    assert sorted(utility["domains"]) == ["cat", "dog"] and utility["served_share"] == 1.0 and utility["real_images"] == 12
    assert np.isfinite(utility["frechet_distance"]) and utility["frechet_distance"] > 0
    assert utility["heldout_denoising_loss"] > 0 and "VAE encoder" in utility["method"]


def test_a_local_vision_model_can_be_the_feature_space(tmp_path):
    """[utility] feature_model: a transformers folder (a tiny CLIP vision tower built here) replaces
    the default feature space, as Inception is FID's; a folder without its image processor is refused."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from s2l_guard.utility import load_feature_model

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    with pytest.raises(S2LError, match="preprocessor_config.json"):
        load_feature_model(str(tmp_path / "clip"))
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(tmp_path / "clip")
    model = load_feature_model(str(tmp_path / "clip"))
    sevens, ones = digits_of(7)[:40], digits_of(1)[:40]
    a, b = model.features(sevens), model.features(ones)
    assert a.shape == (40, 16) and np.isfinite(a).all()
    assert frechet_distance(a[:20], a[20:]) < frechet_distance(a, b)  # a random tower still tells 7s from 1s

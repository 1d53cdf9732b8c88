import pytest
import torch

from s2l_guard.sampling import sample
from s2l_guard.testing import tiny_bundle

PROMPTS = ["a digit seven", "a digit eight", "a digit seven"]


def test_same_seed_same_images_and_other_seed_other_images():
    bundle = tiny_bundle()
    a = sample(bundle, PROMPTS, steps=5, seed=3)
    assert torch.equal(a, sample(bundle, PROMPTS, steps=5, seed=3))
    assert not torch.equal(a, sample(bundle, PROMPTS, steps=5, seed=4))
    assert a.shape == (3, 1, 8, 8) and 0 <= a.min() and a.max() <= 1


def test_batch_size_does_not_change_the_images():
    bundle = tiny_bundle()
    a = sample(bundle, PROMPTS, steps=4, seed=0, batch_size=3)
    b = sample(bundle, PROMPTS, steps=4, seed=0, batch_size=1)
    assert torch.allclose(a, b, atol=1e-5)


def test_guidance_changes_the_output_and_one_disables_it():
    bundle = tiny_bundle()
    guided = sample(bundle, PROMPTS, steps=4, guidance_scale=5.0)
    plain = sample(bundle, PROMPTS, steps=4, guidance_scale=1.0)
    assert not torch.allclose(guided, plain)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="guidance_scale"):
        sample(tiny_bundle(), PROMPTS, guidance_scale=0.5)

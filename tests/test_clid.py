"""CLiD against its definition: the caption's lowering of the denoising loss, per image, on shared noise."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from attacks.base import MIA
from attacks.mia.clid import reduced_caption
from s2l_guard.testing import tiny_bundle

CAPTIONS = ("a handwritten digit seven", "a handwritten digit eight")


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) > 0.5).float(), [CAPTIONS[i % 2] for i in range(n)]


@torch.no_grad()
def reference(bundle, images, captions, *, timesteps, seed, reduced_sets, loss_weight=0.0):
    """Per image: mean over reduced captions of L(x, c*) - L(x, c), minus loss_weight x L(x, c), each
    L the mean squared noise-prediction error over ``timesteps`` with the noise drawn for that image."""
    scheduler = DDPMScheduler.from_config(bundle.scheduler.config)
    noise = torch.randn((len(images), len(timesteps), 1, 1, 8, 8), generator=torch.Generator().manual_seed(seed))

    def loss(i, caption):
        x0, context = images[i : i + 1] * 2 - 1, bundle.encode_prompts([caption])
        errors = []
        for j, t in enumerate(timesteps):
            t = torch.tensor([t])
            eps = noise[i, j]
            xt = scheduler.add_noise(x0, eps, t)
            errors.append(((bundle.unet(xt, t, context).sample - eps) ** 2).mean().item())
        return float(np.mean(errors))

    out = []
    for i, caption in enumerate(captions):
        conditional = loss(i, caption)
        discrepancy = np.mean([loss(i, texts[i]) - conditional for texts in reduced_sets])
        out.append(discrepancy - loss_weight * conditional)
    return np.array(out)


@pytest.mark.parametrize("cut_shares, loss_weight", [((), 0.0), ((0.3, 0.5), 0.5)])
def test_clid_matches_a_per_image_reference(cut_shares, loss_weight):
    bundle = tiny_bundle()
    images, captions = data(5)
    cls = MIA.get("clid")
    attack = cls(cls.Settings(timesteps=(8, 10, 12), cut_shares=cut_shares, loss_weight=loss_weight))
    got = attack.score(bundle, images, captions, seed=4, batch_size=2)
    reduced = [[""] * 5] + [[reduced_caption(c, share) for c in captions] for share in cut_shares]
    want = reference(bundle, images, captions, timesteps=(8, 10, 12), seed=4, reduced_sets=reduced, loss_weight=loss_weight)
    assert got.dtype == np.float64 and got.shape == (5,)
    # scores are differences of float32 losses of order 0.1: roundoff reaches 1.6e-7 on some CPUs
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_reduced_captions_drop_the_last_words():
    assert reduced_caption("a handwritten digit seven", 0.25) == "a handwritten digit"
    assert reduced_caption("a handwritten digit seven", 0.3) == "a handwritten"  # ceil(1.2) = 2 words go
    assert reduced_caption("a handwritten digit seven", 0.5) == "a handwritten"
    assert reduced_caption("a handwritten digit seven", 1.0) == ""


def test_a_caption_the_model_ignores_scores_zero():
    """With the caption replaced by the null caption itself, the discrepancy is exactly zero."""
    bundle = tiny_bundle()
    images, _ = data(3)
    scores = MIA.get("clid")(MIA.get("clid").Settings(timesteps=(10,))).score(bundle, images, [""] * 3, seed=0)
    np.testing.assert_array_equal(scores, np.zeros(3))


@pytest.mark.parametrize("settings, message", [(dict(timesteps=()), "at least one timestep"), (dict(cut_shares=(0.0,)), "cut_shares"),
                                               (dict(loss_weight=-1.0), "loss_weight")])  # fmt: skip
def test_invalid_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        MIA.get("clid").Settings(**settings)

import pytest
import torch

from attacks.base import SHAKERS
from attacks.gaussian import GaussianSettings
from s2l_guard.testing import tiny_bundle


def shake(settings, seed=0, bundle=None):
    return SHAKERS.get("gaussian")(settings).shake(bundle or tiny_bundle(), None, seed=seed)


def test_noise_has_the_requested_scale_and_touches_only_targets():
    bundle = tiny_bundle()
    result = shake(GaussianSettings(sigma=1e-2, targets=("unet.",)), bundle=bundle)
    before, after = dict(bundle.named_parameters()), dict(result.bundle.named_parameters())
    diffs = torch.cat([(after[n] - before[n]).flatten() for n in before if n.startswith("unet.")])
    assert diffs.std().item() == pytest.approx(1e-2, rel=0.05) and abs(diffs.mean().item()) < 1e-3
    assert all(torch.equal(after[n], before[n]) for n in before if not n.startswith("unet."))
    assert result.trainable_parameters == diffs.numel()


def test_seeded_and_the_input_bundle_is_untouched():
    bundle = tiny_bundle()
    snapshot = {n: p.clone() for n, p in bundle.named_parameters()}
    a = shake(GaussianSettings(sigma=1e-3), seed=1, bundle=bundle)
    b = shake(GaussianSettings(sigma=1e-3), seed=1, bundle=bundle)
    c = shake(GaussianSettings(sigma=1e-3), seed=2, bundle=bundle)
    pa, pb, pc = (next(r.bundle.unet.parameters()) for r in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert all(torch.equal(p, snapshot[n]) for n, p in bundle.named_parameters())


def test_zero_sigma_is_the_identity_and_bad_targets_are_errors():
    bundle = tiny_bundle()
    same = shake(GaussianSettings(sigma=0.0), bundle=bundle).bundle
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(bundle.named_parameters(), same.named_parameters()))
    with pytest.raises(ValueError, match="no weight name starts with"):
        shake(GaussianSettings(targets=("decoder.",)))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        GaussianSettings(sigma=-1.0)

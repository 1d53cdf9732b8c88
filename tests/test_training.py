import pytest
import torch

from s2l_guard.errors import S2LError
from s2l_guard.testing import tiny_bundle
from s2l_guard.training import TrainSettings, denoising_losses, train


def toy_data(n=16):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 1, 8, 8, generator=g) > 0.5).float()
    captions = ["a digit seven" if i % 2 else "a digit eight" for i in range(n)]
    return images, captions


def run(bundle, steps, names=("unet.",), checkpoint_dir=None, on_step=None, lr=1e-3, lr_schedule="constant", ema_decay=0.0):
    images, captions = toy_data()
    trainable = {n: p for n, p in bundle.named_parameters() if n.startswith(names)}
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr)
    settings = TrainSettings(steps=steps, batch_size=8, seed=5, checkpoint_every=3, lr_schedule=lr_schedule, warmup_steps=2,
                             ema_decay=ema_decay)  # fmt: skip
    return train(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=settings,
                 checkpoint_dir=checkpoint_dir, on_step=on_step)  # fmt: skip


def snapshot(bundle):
    return {n: p.detach().clone() for n, p in bundle.named_parameters()}


def test_training_lowers_the_denoising_loss():
    bundle = tiny_bundle()
    images, captions = toy_data()
    before = denoising_losses(bundle, images, captions, timesteps=[10, 50, 90], draws=2, seed=0).mean()
    run(bundle, 80, lr=1e-2)
    after = denoising_losses(bundle, images, captions, timesteps=[10, 50, 90], draws=2, seed=0).mean()
    assert after < 0.85 * before


@pytest.mark.parametrize("names", [("unet.",), ("text_encoder.",), ("unet.conv_out.",)])
def test_only_trainable_parameters_change(names):
    bundle = tiny_bundle()
    before = snapshot(bundle)
    run(bundle, 3, names=names)
    changed = {n for n, p in bundle.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(names) for n in changed)
    assert not any(p.requires_grad or p.grad is not None for _, p in bundle.named_parameters())  # frozen again afterwards


@pytest.mark.parametrize("schedule, ema_decay", [("constant", 0.0), ("cosine", 0.0), ("constant_with_warmup", 0.9)])
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, schedule, ema_decay):
    straight = tiny_bundle()
    full = run(straight, 10, lr_schedule=schedule, ema_decay=ema_decay)

    class Killed(Exception):
        pass

    def die_at_7(step, loss):
        if step == 7:
            raise Killed

    interrupted = tiny_bundle()
    with pytest.raises(Killed):
        run(interrupted, 10, checkpoint_dir=tmp_path, on_step=die_at_7, lr_schedule=schedule, ema_decay=ema_decay)
    resumed = tiny_bundle()  # a fresh process would start from the initial weights
    result = run(resumed, 10, checkpoint_dir=tmp_path, lr_schedule=schedule, ema_decay=ema_decay)
    assert result.resumed_from == 6  # last checkpoint before the crash
    assert result.losses == full.losses
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    if ema_decay:  # the moving average resumes too, bit for bit
        assert result.ema.optimization_step == full.ema.optimization_step == 10
        assert all(torch.equal(a, b) for a, b in zip(full.ema.shadow_params, result.ema.shadow_params))


def test_ema_is_the_warmed_up_moving_average_of_the_weights():
    """SD's EMA: shadow <- shadow - (1 - d_s) (shadow - w_s) with d_s = min(decay, (1 + s') / (10 + s')), s' = s - 1."""
    bundle = tiny_bundle()
    name = "unet.conv_out.bias"
    param = dict(bundle.named_parameters())[name]
    history = []
    result = run(bundle, 12, names=(name,), lr=1e-2, ema_decay=0.8, on_step=lambda step, loss: history.append(param.detach().clone()))
    expected = None
    for s, weights in enumerate(history, start=1):
        d = 0.0 if s == 1 else min(0.8, s / (9 + s))
        expected = weights.clone() if expected is None else expected - (1 - d) * (expected - weights)
    [shadow] = result.ema.shadow_params
    assert torch.allclose(shadow, expected, atol=1e-7)
    assert not torch.allclose(shadow, param)  # an average, not the last weights


def rates_of(schedule: str, warmup: int, steps: int = 8) -> list[float]:
    """The learning rate after each step of a run under ``schedule``."""
    bundle = tiny_bundle()
    images, captions = toy_data()
    trainable = dict(bundle.named_parameters())
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    rates = []
    settings = TrainSettings(steps=steps, batch_size=4, lr_schedule=schedule, warmup_steps=warmup)
    train(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=settings,
          on_step=lambda step, loss: rates.append(optimizer.param_groups[0]["lr"]))  # fmt: skip
    return rates


def test_constant_with_warmup_holds_the_rate_after_warmup():
    rates = rates_of("constant_with_warmup", warmup=4)
    assert rates[0] == pytest.approx(0.25e-3) and rates[2] == pytest.approx(0.75e-3)
    assert rates[3:] == pytest.approx([1e-3] * 5)


def test_cosine_schedule_decays_the_rate_to_zero():
    rates = rates_of("cosine", warmup=2)
    assert rates[1] == pytest.approx(1e-3)  # after the warm-up
    assert rates[1] > rates[4] > rates[-1] and rates[-1] == pytest.approx(0.0)


def test_bad_inputs_are_errors():
    bundle = tiny_bundle()
    images, captions = toy_data()
    trainable = dict(bundle.named_parameters())
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    with pytest.raises(S2LError, match="one caption per image"):
        train(bundle, images, captions[:3], trainable=trainable, optimizer=optimizer, settings=TrainSettings(1, 2))
    with pytest.raises(S2LError, match="not in the bundle"):
        train(bundle, images, captions, trainable={"unet.nope": torch.nn.Parameter(torch.zeros(1))},
              optimizer=optimizer, settings=TrainSettings(1, 2))  # fmt: skip


def test_diverging_loss_stops_with_advice():
    bundle = tiny_bundle()
    with pytest.raises(S2LError, match="lower the learning rate"):
        run(bundle, 30, lr=1e12)
    assert not any(p.requires_grad or p.grad is not None for _, p in bundle.named_parameters())  # frozen after a failure too


def test_denoising_losses_do_not_depend_on_batch_size():
    bundle = tiny_bundle()
    images, captions = toy_data()
    a = denoising_losses(bundle, images, captions, timesteps=[5, 40], draws=2, seed=1, batch_size=16)
    b = denoising_losses(bundle, images, captions, timesteps=[5, 40], draws=2, seed=1, batch_size=5)
    assert torch.allclose(a, b, atol=1e-6)

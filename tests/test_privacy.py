import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from test_training import snapshot, toy_data

from s2l_guard import training
from s2l_guard.errors import ConfigError, S2LError
from s2l_guard.model import load_bundle
from s2l_guard.privacy import DenoisingLossModule, DPHooks, PrivacySettings, train_private
from s2l_guard.sampling import sample
from s2l_guard.testing import tiny_bundle
from s2l_guard.training import PriorPreservation, TrainSettings, denoising_losses, train

BOTH = ("unet.", "text_encoder.")
LOOSE = 1e4  # an epsilon so large the noise is small: for tests about what training does


def run(bundle, *, steps=3, names=BOTH, epsilon=LOOSE, accountant="rdp", physical=64, seed=5, lr=1e-3, batch_size=8,
        images=None, captions=None, optimizer=None, on_step=None, **privacy):  # fmt: skip
    if images is None:
        images, captions = toy_data()
    trainable = {n: p for n, p in bundle.named_parameters() if n.startswith(names)}
    optimizer = optimizer or torch.optim.AdamW(trainable.values(), lr=lr)
    return train_private(
        bundle, images, captions, trainable=trainable, optimizer=optimizer,
        settings=TrainSettings(steps=steps, batch_size=batch_size, seed=seed),
        privacy=PrivacySettings(target_epsilon=epsilon, accountant=accountant, physical_batch_size=physical, **privacy),
        on_step=on_step,
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("names", [BOTH, ("unet.up_blocks.", "text_encoder.encoder.", "unet.conv_out.")])
def test_per_sample_gradients_match_one_example_at_a_time(names):
    bundle = tiny_bundle()
    bundle.unet.double().train()
    bundle.text_encoder.double().train()
    for name, p in bundle.named_parameters():
        p.requires_grad_(name.startswith(names))
    trainable = {n: p for n, p in bundle.named_parameters() if p.requires_grad}
    module = DenoisingLossModule(bundle, train_text_encoder=True)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 50, 97])
    tokens = bundle.tokenize(["a digit seven", "", "a digit eight"])  # one dropped caption

    wrapped = GradSampleModule(module, loss_reduction="mean")  # what PrivacyEngine.make_private builds
    wrapped(z0, t, noise, tokens).mean().backward()
    per_sample = {n: p.grad_sample.clone() for n, p in bundle.named_parameters() if getattr(p, "grad_sample", None) is not None}
    wrapped.to_standard_module()
    assert set(per_sample) == set(trainable)  # every trainable parameter, no frozen one

    for i in range(3):
        for p in trainable.values():
            p.grad = None
        module(z0[i : i + 1], t[i : i + 1], noise[i : i + 1], tokens[i : i + 1]).sum().backward()
        expected = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in trainable.items()}
        scale = max(g.abs().max().item() for g in expected.values())  # some are 0 up to rounding (CLIP's k_proj.bias)
        for name in trainable:
            assert torch.allclose(per_sample[name][i], expected[name], rtol=1e-7, atol=1e-12 * scale), name


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_is_the_accountants(accountant):
    result = run(tiny_bundle(), steps=3, epsilon=4.0, accountant=accountant, names=("unet.conv_out.",))
    assert result.steps == 3 and len(result.losses) == 3
    assert result.sample_rate == 8 / 16 and result.expected_batch_size == 8
    assert result.delta == pytest.approx(1 / (10 * 16))
    assert result.accountant_history == [(result.noise_multiplier, result.sample_rate, 3)]
    fresh = create_accountant(accountant)
    for _ in range(result.steps):
        fresh.step(noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate)
    assert fresh.get_epsilon(result.delta) == pytest.approx(result.epsilon, rel=1e-9)
    assert 4.0 - 0.05 <= result.epsilon <= 4.0


def test_dp_training_learns_and_leaves_frozen_weights_alone():
    bundle = tiny_bundle()
    images, captions = toy_data()
    names = ("unet.down_blocks.", "unet.mid_block.", "unet.up_blocks.", "unet.conv_out.")  # unet.conv_in etc. frozen
    before = snapshot(bundle)
    loss_before = denoising_losses(bundle, images, captions, timesteps=[10, 50, 90], draws=2, seed=0).mean()
    result = run(bundle, steps=40, names=names, lr=1e-2)
    loss_after = denoising_losses(bundle, images, captions, timesteps=[10, 50, 90], draws=2, seed=0).mean()
    assert loss_after < 0.9 * loss_before
    assert all(torch.isfinite(torch.tensor(result.losses)))
    changed = {n for n, p in bundle.named_parameters() if not torch.equal(p, before[n])}
    trained = {n for n, _ in bundle.named_parameters() if n.startswith(names)}
    assert changed == trained  # every trained tensor moved (opacus issue 820: it silently did not)
    assert not any(p.requires_grad for _, p in bundle.named_parameters())


def test_same_seed_same_run_and_physical_batches_do_not_change_it():
    first, second, split = tiny_bundle(), tiny_bundle(), tiny_bundle()
    a = run(first, steps=3, batch_size=4)
    b = run(second, steps=3, batch_size=4)
    c = run(split, steps=3, batch_size=4, physical=2)  # 4-ish examples per logical batch, in chunks of 2
    assert a.losses == b.losses
    for (name, p), (_, q), (_, r) in zip(first.named_parameters(), second.named_parameters(), split.named_parameters()):
        assert torch.equal(p, q), name
        # float32 summation order differs between physical splits; AMD and Intel kernels round differently
        # (1.1e-6 measured on one): a wrong split would move weights by about the learning rate, 1e-3
        assert torch.allclose(p, r, atol=1e-5), name
    assert c.losses == pytest.approx(a.losses, rel=1e-5)
    assert run(tiny_bundle(), steps=3, batch_size=4, seed=6).losses != a.losses


@pytest.mark.filterwarnings("ignore")  # functorch's per-sample gradients warn about CPU autocast
@pytest.mark.parametrize("mode", ["functorch", "ghost"])
def test_every_grad_sample_mode_trains_the_same_model(mode):
    """opacus' engines differ in speed (benchmarks/dp_step.py), not in the clipped, noised step."""
    hooks, other = tiny_bundle(), tiny_bundle()
    a = run(hooks, steps=3, batch_size=4, grad_sample_mode="hooks")
    b = run(other, steps=3, batch_size=4, grad_sample_mode=mode)
    assert b.losses == pytest.approx(a.losses, rel=1e-5) and b.epsilon == a.epsilon
    for (name, p), (_, q) in zip(hooks.named_parameters(), other.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name  # 6e-8 (functorch), 1.2e-7 (ghost) measured; a wrong gradient moves them by ~1e-3
    moved = max((p - q).abs().max().item() for (_, p), (_, q) in zip(hooks.named_parameters(), tiny_bundle().named_parameters()))
    assert moved > 1e-4  # the runs trained: agreeing is not agreeing on doing nothing


def test_empty_poisson_batches_still_count_as_steps():
    # An expected batch of 1 out of 16 rows leaves about a third of the logical batches empty.
    bundle = tiny_bundle()
    seen = []
    result = run(bundle, steps=8, batch_size=1, on_step=lambda step, loss: seen.append((step, loss)))
    assert result.steps == 8 and [step for step, _ in seen] == list(range(1, 9))
    assert [loss for _, loss in seen] == pytest.approx(result.losses, nan_ok=True)
    empty = [loss for loss in result.losses if loss != loss]
    assert 0 < len(empty) < 8  # nan marks an empty batch; opacus still noised and counted it
    assert all(torch.isfinite(p).all() for _, p in bundle.named_parameters())


def test_bad_input_is_a_one_line_error():
    def error(exc_type, match, fn):
        with pytest.raises(exc_type, match=match) as info:
            fn()
        assert "\n" not in str(info.value)

    error(ConfigError, "accountant 'gdp' is unknown", lambda: PrivacySettings(accountant="gdp"))
    error(ConfigError, "target_epsilon must be > 0", lambda: PrivacySettings(target_epsilon=0))
    error(ConfigError, "PRV accountant", lambda: PrivacySettings(target_epsilon=1e4, accountant="prv"))
    error(ConfigError, "physical_batch_size", lambda: PrivacySettings(physical_batch_size=0))
    error(ConfigError, "grad_sample_mode .ew. is unknown; use one of hooks, functorch, ghost", lambda: PrivacySettings(grad_sample_mode="ew"))
    error(
        ConfigError,
        "noise_multiplicity > 1 .* use grad_sample_mode = 'hooks'",
        lambda: PrivacySettings(grad_sample_mode="ghost", noise_multiplicity=2),
    )
    error(ConfigError, r"delta = 0.1 is not below 1 / N = 0.0625", lambda: run(tiny_bundle(), delta=0.1))
    error(S2LError, "training set is empty", lambda: run(tiny_bundle(), images=torch.zeros(0, 1, 8, 8), captions=[]))
    images, captions = toy_data()
    error(S2LError, "one caption per image", lambda: run(tiny_bundle(), images=images, captions=captions[:3]))
    error(S2LError, "unet.\\* and text_encoder.\\* parameters only", lambda: _train_vae())
    bundle = tiny_bundle()
    copy = torch.nn.Parameter(bundle.unet.conv_out.bias.detach().clone())
    error(S2LError, "not the bundle's own parameters", lambda: train_private(
        bundle, images, captions, trainable={"unet.conv_out.bias": copy}, optimizer=torch.optim.SGD([copy], lr=0.1),
        settings=TrainSettings(steps=1, batch_size=8), privacy=PrivacySettings()))  # fmt: skip
    error(S2LError, "optimizer must be built over exactly",
          lambda: run(bundle, optimizer=torch.optim.SGD(bundle.unet.conv_in.parameters(), lr=0.1)))  # fmt: skip
    error(S2LError, "lower the learning rate", _diverge)
    error(S2LError, "cannot resume from a checkpoint", lambda: _dp_train(checkpoint_dir="somewhere"))
    error(S2LError, "takes no prior preservation", lambda: _dp_train(prior=PriorPreservation(torch.zeros(2, 1, 8, 8), "a digit")))


def _dp_train(**kwargs):
    bundle = tiny_bundle()
    images, captions = toy_data()
    trainable = {n: p for n, p in bundle.named_parameters() if n.startswith("unet.conv_out.")}
    train(bundle, images, captions, trainable=trainable, optimizer=torch.optim.SGD(trainable.values(), lr=0.1),
          settings=TrainSettings(steps=1, batch_size=8), hooks=DPHooks(PrivacySettings(target_epsilon=LOOSE)), **kwargs)  # fmt: skip


def _diverge():
    bundle = tiny_bundle()
    trainable = {n: p for n, p in bundle.named_parameters() if n.startswith("unet.")}
    run(bundle, steps=30, names=("unet.",), optimizer=torch.optim.SGD(trainable.values(), lr=1e12))


def _train_vae():
    from s2l_guard.testing import tiny_latent_bundle

    bundle = tiny_latent_bundle()
    images = torch.rand(4, 3, 16, 16)
    run(bundle, names=("vae.",), images=images, captions=["a digit one"] * 4)


def test_a_module_opacus_cannot_handle_is_named_and_the_bundle_stays_clean():
    bundle = tiny_bundle()
    bundle.unet.conv_out.register_buffer("scale", torch.ones(1))  # opacus refuses trainable layers with buffers
    with pytest.raises(S2LError, match=r"per-sample gradients for unet\.conv_out \(Conv2d\).*leave those parameters out") as info:
        run(bundle)
    assert "\n" not in str(info.value)
    assert_plain(bundle)


def assert_plain(bundle):
    for prefix, module in bundle.modules().items():
        for name, sub in module.named_modules():
            where = f"{prefix}.{name}"
            assert not (sub._forward_hooks or sub._backward_hooks or sub._forward_pre_hooks or sub._backward_pre_hooks), where
            assert not {"activations", "max_batch_len", "ft_compute_sample_grad", "autograd_grad_sample_hooks"} & set(vars(sub)), where
            assert not sub.training, where
    for name, p in bundle.named_parameters():
        assert not p.requires_grad and p.grad is None, name
        assert not {"grad_sample", "_forward_counter", "summed_grad", "_current_grad_sample"} & set(vars(p)), name


def test_after_dp_training_the_bundle_is_plain_and_saves_loads_and_samples(tmp_path):
    bundle = tiny_bundle()
    run(bundle, steps=2)
    assert_plain(bundle)
    loaded = load_bundle(bundle.save(tmp_path / "dp"))
    for (name, p), (_, q) in zip(bundle.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name
    a = sample(bundle.clone(), ["a digit seven"], steps=2, seed=0)
    b = sample(loaded, ["a digit seven"], steps=2, seed=0)
    assert torch.equal(a, b)


def test_train_private_takes_the_one_loops_steps(monkeypatch):
    taken, take_step = [], training._take_step

    def counted(prepared, hooks, optimizer, step):
        taken.append((type(hooks), step))
        return take_step(prepared, hooks, optimizer, step)

    monkeypatch.setattr(training, "_take_step", counted)
    run(tiny_bundle(), steps=3, names=("unet.conv_out.",))
    assert taken == [(DPHooks, 0), (DPHooks, 1), (DPHooks, 2)]


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp"])
def test_plain_and_dp_steps_share_schedule_ema_and_callbacks(private):
    """One loop: the LR warm-up, the EMA and both callbacks behave the same with or without DP."""
    bundle = tiny_bundle()
    images, captions = toy_data()
    name = "unet.conv_out.bias"
    param = dict(bundle.named_parameters())[name]
    optimizer = torch.optim.AdamW([param], lr=1e-2)
    settings = TrainSettings(steps=6, batch_size=8, seed=5, lr_schedule="constant_with_warmup", warmup_steps=3, ema_decay=0.8)
    seen, after = [], []
    hooks = DPHooks(PrivacySettings(target_epsilon=LOOSE)) if private else None
    result = train(bundle, images, captions, trainable={name: param}, optimizer=optimizer, settings=settings, hooks=hooks,
                   on_step=lambda step, loss: seen.append((step, loss, optimizer.param_groups[0]["lr"], param.detach().clone())),
                   after_step=lambda: after.append(param.detach().clone()))  # fmt: skip
    assert [step for step, *_ in seen] == [1, 2, 3, 4, 5, 6] and len(after) == 6
    assert [loss for _, loss, *_ in seen] == result.losses
    assert [rate for _, _, rate, _ in seen] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2, 1e-2, 1e-2])
    assert all(torch.equal(a, w) for a, (*_, w) in zip(after, seen))  # after_step sees the stepped weights
    expected = None
    for s, (*_, weights) in enumerate(seen, start=1):  # SD's warmed-up EMA, as test_training checks for plain runs
        d = 0.0 if s == 1 else min(0.8, s / (9 + s))
        expected = weights.clone() if expected is None else expected - (1 - d) * (expected - weights)
    [shadow] = result.ema.shadow_params
    assert result.ema.optimization_step == 6 and torch.allclose(shadow, expected, atol=1e-7)
    assert_plain(bundle)


def record_dp_steps(monkeypatch, *, clip: bool = True, noise: bool = True, max_grad_norm: float = 1e-3, **privacy):
    """Train a few DP steps of one example per physical batch and record, from opacus' optimizer,
    each example's contribution to the summed gradient (its norm, and its norm before clipping)
    and the noise added to the sum. ``clip`` / ``noise`` False break DP on purpose."""
    from opacus.optimizers.optimizer import DPOptimizer

    if privacy.get("grad_sample_mode") == "ghost":
        return record_ghost_steps(monkeypatch, clip=clip, noise=noise, max_grad_norm=max_grad_norm, **privacy)
    clip_and_accumulate, add_noise = DPOptimizer.clip_and_accumulate, DPOptimizer.add_noise
    contributions, raw_norms, noise_values = [], [], []

    def recording_clip(self):
        before = [p.summed_grad.clone() if p.summed_grad is not None else torch.zeros_like(p) for p in self.params]
        assert len(self.grad_samples[0]) <= 1  # one example per physical batch, however many draws it had
        if len(self.grad_samples[0]):
            raw_norms.append(torch.stack([g.flatten().norm() for g in self.grad_samples]).norm().item())
        bound = self.max_grad_norm
        self.max_grad_norm = bound if clip else 1e9
        try:
            clip_and_accumulate(self)
        finally:
            self.max_grad_norm = bound
        contributions.append(torch.stack([(p.summed_grad.view_as(p) - b).norm() for p, b in zip(self.params, before)]).norm().item())

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", recording_clip)
    monkeypatch.setattr(DPOptimizer, "add_noise", recording_noise(add_noise, noise, noise_values))
    result = run(tiny_bundle(), steps=3, batch_size=4, epsilon=10.0, physical=1, max_grad_norm=max_grad_norm, **privacy)
    return result, contributions, raw_norms, torch.cat(noise_values)


def recording_noise(add_noise, noise: bool, noise_values: list):
    """``add_noise`` that records the noise it added to the sum (none when ``noise`` is False)."""

    def recording(self):
        multiplier = self.noise_multiplier
        self.noise_multiplier = multiplier if noise else 0.0
        try:
            add_noise(self)
        finally:
            self.noise_multiplier = multiplier
        noise_values.append(torch.cat([(p.grad - p.summed_grad.view_as(p)).flatten() for p in self.params]))

    return recording


def record_ghost_steps(monkeypatch, *, clip: bool, noise: bool, max_grad_norm: float, **privacy):
    """:func:`record_dp_steps` for ghost clipping, where no per-sample gradient exists: each
    example's norm comes from the module's clipping factor, its contribution from what the
    optimizer accumulates (the gradient of the factor-weighted loss)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as Module
    from opacus.optimizers import DPOptimizerFastGradientClipping as Optimizer

    get_clipping_coef, accumulate, add_noise = Module.get_clipping_coef, Optimizer.accumulate, Optimizer.add_noise
    contributions, raw_norms, noise_values = [], [], []

    def recording_coef(self):
        factors = get_clipping_coef(self)
        raw_norms.extend(self.per_sample_gradient_norms.tolist())
        return factors if clip else torch.ones_like(factors)

    def recording_accumulate(self):
        before = [p.summed_grad.clone() if p.summed_grad is not None else torch.zeros_like(p) for p in self.params]
        accumulate(self)
        contributions.append(torch.stack([(p.summed_grad.view_as(p) - b).norm() for p, b in zip(self.params, before)]).norm().item())

    monkeypatch.setattr(Module, "get_clipping_coef", recording_coef)
    monkeypatch.setattr(Optimizer, "accumulate", recording_accumulate)
    monkeypatch.setattr(Optimizer, "add_noise", recording_noise(add_noise, noise, noise_values))
    result = run(tiny_bundle(), steps=3, batch_size=4, epsilon=10.0, physical=1, max_grad_norm=max_grad_norm, **privacy)
    return result, contributions, raw_norms, torch.cat(noise_values)


def dp_violations(result, contributions, noise_values, max_grad_norm=1e-3) -> list[str]:
    """What the recorded steps show against the guarantee: per-example contributions above the
    clipping bound, or noise whose standard deviation is not the accountant's multiplier x bound."""
    found = []
    if max(contributions) > max_grad_norm * (1 + 1e-4):
        found.append(f"an example contributed {max(contributions):.3g} > C = {max_grad_norm}")
    expected = result.noise_multiplier * max_grad_norm
    if abs(noise_values.std().item() / expected - 1) > 0.05 or abs(noise_values.mean().item()) > 0.05 * expected:
        found.append(f"noise std {noise_values.std().item():.3g}, the accountant assumed {expected:.3g}")
    return found


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("mode", "draws"), [("hooks", 1), ("hooks", 4), ("ghost", 1)])
def test_each_example_is_clipped_and_the_noise_is_what_the_accountant_assumed(monkeypatch, mode, draws):
    """With noise multiplicity, an example's 4 draws are one clipped contribution, not four.
    Ghost clipping never forms a per-sample gradient: its clipped sum is checked the same way."""
    result, contributions, raw_norms, noise_values = record_dp_steps(monkeypatch, noise_multiplicity=draws, grad_sample_mode=mode)
    assert max(raw_norms) > 10 * 1e-3  # examples' gradients were above the bound: clipping had work to do
    assert len(noise_values) > 10_000  # thousands of noise draws: their std is known to about 1%
    assert dp_violations(result, contributions, noise_values) == []


@pytest.mark.slow  # three DP runs; the fast tier keeps the check itself
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("broken", ["clip", "noise"])
def test_dp_without_clipping_or_without_noise_is_caught(monkeypatch, broken, mode):
    result, contributions, _, noise_values = record_dp_steps(monkeypatch, grad_sample_mode=mode, **{broken: False})
    found = dp_violations(result, contributions, noise_values)
    assert len(found) == 1 and found[0].startswith("an example" if broken == "clip" else "noise std")


def test_noise_multiplicity_averages_each_examples_own_draws():
    from types import SimpleNamespace

    from s2l_guard.privacy import _average_draws_before_clipping, _draws

    first, _, first_noise = _draws(7, 2, torch.tensor([5, 9]), 1000, 0.1, (1, 8, 8))
    t, dropped, noise = _draws(7, 2, torch.tensor([5, 9]), 1000, 0.1, (1, 8, 8), draws=3)
    assert len(t) == len(dropped) == len(noise) == 6
    assert torch.equal(t[[0, 3]], first) and torch.equal(noise[[0, 3]], first_noise)  # one draw per row: as before
    assert len(set(t.tolist())) > 2  # the draws differ

    weight = torch.nn.Parameter(torch.zeros(2, 3))
    weight.grad_sample = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3)  # 2 examples x 2 draws
    seen = []
    optimizer = SimpleNamespace(params=[weight], clip_and_accumulate=lambda: seen.append(weight.grad_sample.clone()))
    _average_draws_before_clipping(optimizer, 2)
    optimizer.clip_and_accumulate()
    expected = torch.arange(24, dtype=torch.float32).reshape(2, 2, 2, 3).mean(1)  # rows 0-1 are example 0, rows 2-3 example 1
    assert torch.equal(seen[0], expected)
    weight.grad_sample = torch.zeros(0, 2, 3)  # an empty Poisson batch
    optimizer.clip_and_accumulate()
    assert seen[1].shape == (0, 2, 3)

"""Defenses and the provider: threat models, the API gates, de-duplication and the fine-tune filter."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attacks.base import SHAKERS, FinetuneData
from defenses.base import DEFENSES, POINTS, Defense
from defenses.dedup import near_duplicate_keep
from defenses.finetune_filter import FinetuneFilter, FinetuneFilterSettings, bootstrap_set_means, relative_drift
from defenses.output_filter import OutputFilter, OutputFilterSettings
from s2l_guard.config import Config, load_config
from s2l_guard.data import ImageDataset, Record
from s2l_guard.errors import S2LError
from s2l_guard.metrics import tiled_l2
from s2l_guard.provider import FinetuneRequest, Provider, ThreatModelError
from s2l_guard.runner.plan import resolve_threat_model
from s2l_guard.testing import tiny_bundle


def test_every_defense_declares_where_it_acts():
    names = DEFENSES.names()
    assert {"none", "dedup", "dp_sgd", "private_finetune", "finetune_filter", "output_filter"} <= set(names)
    for name, cls in DEFENSES.items():
        assert set(cls.points) <= set(POINTS), name
        assert cls().spec()["name"] == name
    assert DEFENSES.get("none").points == ()


def test_auto_threat_model_attacks_api_defenses_through_their_api():
    get = lambda name: DEFENSES.get(name)()  # noqa: E731
    assert resolve_threat_model("auto", get("none")) == "open-weights"
    assert resolve_threat_model("auto", get("dp_sgd")) == "open-weights"
    assert resolve_threat_model("auto", get("finetune_filter")) == "finetune-api"
    assert resolve_threat_model("auto", get("output_filter")) == "finetune-api"
    assert resolve_threat_model("generate-api", get("none")) == "generate-api"


def _lora_request(steps=1):
    shaker = SHAKERS.get("lora")(SHAKERS.get("lora").Settings(steps=steps, batch_size=2, rank=1))
    images = torch.rand(4, 1, 8, 8)
    return FinetuneRequest(shaker, FinetuneData(images, ["a digit seven"] * 4, "a digit seven"), seed=0)


def test_provider_refuses_what_the_threat_model_does_not_allow():
    bundle = tiny_bundle()
    assert Provider(bundle, "open-weights").weights() is bundle
    for threat_model in ("finetune-api", "generate-api"):
        with pytest.raises(ThreatModelError, match="gives no weights"):
            Provider(bundle, threat_model).weights()
    with pytest.raises(ThreatModelError, match="offers no fine-tuning"):
        Provider(bundle, "generate-api").finetune(_lora_request())
    with pytest.raises(ThreatModelError, match="mid-training"):
        Provider(bundle, "finetune-api").finetune(_lora_request(), callback=lambda step, b: None, callback_every=1)
    with pytest.raises(ThreatModelError, match="unknown threat model"):
        Provider(bundle, "weights-please")
    # Behind the fine-tune API the attacker gets generations of the result, never its weights.
    outcome = Provider(bundle, "finetune-api").finetune(_lora_request())
    assert outcome.admitted and outcome.prompt == "a digit seven"
    with pytest.raises(ThreatModelError):
        outcome.provider.weights()
    assert len(outcome.provider.generate(["a digit seven"] * 2, steps=2, guidance_scale=1.0, seed=0).images) == 2


def _dataset(images: torch.Tensor) -> ImageDataset:
    records = [Record(f"public/x-{i}.png", "a digit one", "digit1", "public", 1) for i in range(len(images))]
    return ImageDataset(records, images)


def test_output_filter_acts_behind_the_api_only():
    bundle = tiny_bundle()
    plain = Provider(bundle, "open-weights").generate(["a digit one"] * 6, steps=2, guidance_scale=1.0, seed=3)
    defense = OutputFilter(OutputFilterSettings(radius=0.05))
    # The "training set" holds two of the very images the model generates: those two are withheld.
    defense.prepare(bundle, _dataset(torch.cat([plain.images[[1, 4]], torch.zeros(1, 1, 8, 8)])), Config())
    behind = Provider(bundle, "generate-api", defense).generate(["a digit one"] * 6, steps=2, guidance_scale=1.0, seed=3)
    assert behind.served.tolist() == [True, False, True, True, False, True]
    assert torch.equal(behind.images, plain.images[behind.served])
    # With the weights the attacker samples locally: the API's filter never sees it.
    local = Provider(bundle, "open-weights", defense).generate(["a digit one"] * 6, steps=2, guidance_scale=1.0, seed=3)
    assert local.served.all() and torch.equal(local.images, plain.images)


class _NoisyOutputs(Defense):
    """An output-noise defense in a few lines: the generate API serves every image, each noised."""

    name, paper, summary, threat_models, points = "noisy_outputs", "-", "noise on served images", ("generate-api",), ("generate",)

    @dataclasses.dataclass(frozen=True)
    class Settings:
        sd: float = 0.2
        drop_first: bool = False

    def serve(self, images):
        served = torch.ones(len(images), dtype=torch.bool)
        served[0] = not self.settings.drop_first
        noise = self.settings.sd * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
        return (images + noise).clamp(0, 1)[served], served


def test_a_defense_may_change_what_the_generate_api_serves():
    bundle = tiny_bundle()
    plain = Provider(bundle, "open-weights").generate(["a digit one"] * 4, steps=2, guidance_scale=1.0, seed=3)
    noisy = Provider(bundle, "generate-api", _NoisyOutputs()).generate(["a digit one"] * 4, steps=2, guidance_scale=1.0, seed=3)
    assert noisy.served.all() and noisy.images.shape == plain.images.shape and not torch.equal(noisy.images, plain.images)
    dropped = Provider(bundle, "generate-api", _NoisyOutputs(_NoisyOutputs.Settings(drop_first=True)))
    out = dropped.generate(["a digit one"] * 4, steps=2, guidance_scale=1.0, seed=3)
    assert out.served.tolist() == [False, True, True, True] and len(out.images) == 3
    assert torch.equal(out.images, noisy.images[1:])  # the served images answer requests 1-3, in order


def test_a_serve_hook_that_miscounts_is_refused():
    class Broken(_NoisyOutputs):
        def serve(self, images):
            return images, torch.zeros(len(images), dtype=torch.bool)  # claims nothing served, returns everything

    with pytest.raises(S2LError, match="one image per True entry"):
        Provider(tiny_bundle(), "generate-api", Broken()).generate(["a digit one"] * 2, steps=2, guidance_scale=1.0, seed=0)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 30), st.floats(0.0, 0.6), st.integers(0, 2**16))
def test_dedup_keeps_a_set_that_covers_the_rest(n, radius, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 4, 4, generator=g)
    images = torch.cat([images, images[: n // 2]])  # exact repeats
    keep = near_duplicate_keep(images, radius)
    kept, dropped = images[keep], images[~keep]
    d = tiled_l2(kept, kept)
    assert (d[~torch.eye(len(kept), dtype=torch.bool)] > radius).all()  # no two kept images are near-duplicates
    if len(dropped):
        assert (tiled_l2(dropped, kept).min(1).values <= radius).all()  # every dropped one has a kept near-duplicate
    assert keep[:n].sum() >= 1 and not keep[n:].any()  # repeats of earlier images always go


def test_filter_calibration_hits_its_false_rejection_rate_on_held_out_benign_sets():
    """The threshold is fitted on one pool and checked on an independent one from the same distribution."""
    rng = np.random.default_rng(0)
    f = FinetuneFilter(FinetuneFilterSettings(false_rejection_rate=0.1, calibration_sets=4000))
    f.pool_losses = rng.gamma(4.0, 0.05, 100_000)
    f.calibration_losses, f.heldout_losses = f.pool_losses[:50_000], f.pool_losses[50_000:]
    for size in (5, 40):
        result = f.heldout_false_rejection(size, sets=4000, splits=3)
        sd = np.sqrt(0.1 * 0.9 / 4000) + np.sqrt(0.1 * 0.9 / 4000)  # held-out sets + the threshold's own sets
        assert abs(result["rate"] - 0.1) < 3 * sd, result
        assert abs(result["across_splits"]["mean"] - 0.1) < 3 * sd, result
        assert result["ci95"][0] <= result["rate"] <= result["ci95"][1]
    # Data that denoises better than benign data (lower loss) is caught; benign-looking data is not.
    assert f.detection(np.full(100, 0.05), 10)["rate"] == 1.0
    assert f.detection(np.full(100, 0.5), 10)["rate"] == 0.0


def test_bootstrap_sets_are_reproducible():
    losses = np.arange(10.0)
    assert np.array_equal(bootstrap_set_means(losses, 3, 50, seed=1), bootstrap_set_means(losses, 3, 50, seed=1))
    assert bootstrap_set_means(losses, 3, 50, seed=1).shape == (50,)


def test_filter_refuses_long_jobs_and_large_drift_and_says_why():
    bundle = tiny_bundle()
    f = FinetuneFilter(FinetuneFilterSettings(max_steps=2, max_drift=1e-9, timesteps=(10, 50)))
    f.calibration_losses = f.heldout_losses = np.full(50, -1.0)  # every request passes the detector
    refused = Provider(bundle, "finetune-api", f).finetune(_lora_request(steps=3))
    assert not refused.admitted and "3 steps" in refused.reason
    drifted = Provider(bundle, "finetune-api", f).finetune(_lora_request(steps=1))
    assert not drifted.admitted and "moved" in drifted.reason and drifted.evidence["drift"] > 0
    # Under open-weights the attacker trains its own copy: the API's limits do not apply.
    assert Provider(bundle, "open-weights", f).finetune(_lora_request(steps=3)).admitted


def test_detector_decides_by_its_threshold():
    bundle = tiny_bundle()
    f = FinetuneFilter(FinetuneFilterSettings(timesteps=(50,), draws=1, calibration_sets=200))
    request = _lora_request()
    statistic = float(f.image_losses(bundle, request.data.images, list(request.data.captions)).mean())
    for shift, admitted in ((+0.01, False), (-0.01, True)):
        f.calibration_losses = f.heldout_losses = np.full(40, statistic + shift)
        f.threshold.cache_clear()
        review = f.review(bundle, request)
        assert review.admitted is admitted and review.evidence["statistic"] == pytest.approx(statistic)


def test_relative_drift_is_zero_for_an_unchanged_model_and_counts_new_rows():
    bundle = tiny_bundle()
    assert relative_drift(bundle, bundle.clone()) == 0.0
    moved = bundle.clone()
    with torch.no_grad():
        next(moved.unet.parameters()).add_(1.0)
    assert relative_drift(bundle, moved) > 0


def test_filter_timesteps_must_fit_the_model():
    f = FinetuneFilter(FinetuneFilterSettings(timesteps=(50, 400)))
    with pytest.raises(Exception, match="reach past the model's 100 training timesteps"):
        f.image_losses(tiny_bundle(), torch.rand(2, 1, 8, 8), ["a", "a"])


def test_filter_calibrated_on_the_testbeds_unused_digits_holds_its_rate_on_the_other_half():
    """prepare() on real images: calibration half vs held-out half of the digits the testbed leaves out.

    The halves are finite (248 images each), so besides the binomial error of the sets the
    held-out rate of one split moves with the halves' own difference; averaged over random
    re-splits it is the rate the procedure has.
    """
    f = FinetuneFilter(FinetuneFilterSettings(false_rejection_rate=0.1, timesteps=(10, 50), calibration_sets=4000))
    f.prepare(tiny_bundle(), None, Config())
    assert len(f.calibration_losses) + len(f.heldout_losses) == 496
    for size in (5, 100):  # 100 images: the pool's own uncertainty dominates; the predictive calibration allows for it
        result = f.heldout_false_rejection(size, sets=2000, splits=20)
        assert abs(result["across_splits"]["mean"] - 0.1) < 0.04, result


def test_anneal_continues_the_undefended_model_with_the_rate_decayed_to_zero(tmp_path):
    """The anneal defense reuses the cached undefended model, trains it on for its own steps with
    the rate falling to zero, and releases something else than the undefended weights."""
    from pathlib import Path

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from defenses.anneal import AnnealSettings
    from s2l_guard.cache import Store
    from s2l_guard.model import load_bundle
    from s2l_guard.runner.stages import pretrain_stage, testbed_stage

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "smoke.toml").replace(run={"store": str(tmp_path / "store")})
    store = Store(config.run.store)
    data = testbed_stage(store, config)
    plain = pretrain_stage(store, config, data, torch.device("cpu"))
    defense = DEFENSES.get("anneal")(AnnealSettings(steps=6, warmup_steps=1, ema_decay=0.5))
    steps = []  # every optimizer step the anneal takes: its optimizer and the rate of each parameter group
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: steps.append((opt, [g["lr"] for g in opt.param_groups])))
    try:
        annealed = pretrain_stage(store, config, data, torch.device("cpu"), defense)
    finally:
        hook.remove()
    assert annealed.key != plain.key and not annealed.reused
    assert len(list((tmp_path / "store" / "bundle").iterdir())) == 2  # the undefended model was reused, not retrained
    import json

    summary = json.loads((annealed.path / "training.json").read_text())
    assert summary["anneal"]["steps"] == 6 and summary["anneal"]["released"] == "ema" and summary["steps"] == config.pretrain.steps
    # The rates the optimizer applied: one optimizer (nothing else trained), one step per anneal step, warming up
    # for one step to the pre-training rate, then falling every step, and zero once the last step is taken.
    [optimizer] = {id(opt): opt for opt, _ in steps}.values()
    rates = [rate for _, (rate,) in steps]
    lr = summary["anneal"]["learning_rate"]
    assert lr == config.pretrain.learning_rate > 0 and len(rates) == 6, (lr, rates)
    assert rates[0] < rates[1] == pytest.approx(lr) and all(a > b > 0 for a, b in zip(rates[1:], rates[2:])), rates
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.0, abs=lr * 1e-9)], (rates, optimizer.param_groups[0]["lr"])
    a, b = load_bundle(plain.path), load_bundle(annealed.path)
    moved = [n for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()) if not torch.equal(p, q)]
    assert moved and all(n.startswith("unet.") for n in moved)
    for bad in ({"steps": 0}, {"schedule": "constant"}, {"warmup_steps": 6, "steps": 6}, {"ema_decay": 1.0}):
        with pytest.raises(ValueError, match="anneal"):
            AnnealSettings(**bad)


@pytest.mark.filterwarnings("ignore")
def test_private_finetune_pretrains_its_public_part_once_for_every_epsilon(tmp_path):
    """The public pre-training is kept in the store by its rows: a second epsilon reuses it, and the
    model released through the store equals the one trained without it."""
    from pathlib import Path

    from defenses.private_finetune import PrivateFinetuneSettings
    from s2l_guard.cache import Store
    from s2l_guard.data import load_imagefolder
    from s2l_guard.model import load_bundle
    from s2l_guard.runner.stages import defense_context, pretrain_stage, testbed_stage

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "smoke.toml").replace(run={"store": str(tmp_path / "store")})
    store, cpu = Store(config.run.store), torch.device("cpu")
    data = testbed_stage(store, config)
    defense = lambda epsilon: DEFENSES.get("private_finetune")(PrivateFinetuneSettings(target_epsilon=epsilon, steps=3, batch_size=8))  # noqa: E731
    first = pretrain_stage(store, config, data, cpu, defense(10.0))
    second = pretrain_stage(store, config, data, cpu, defense(3.0))
    assert first.key != second.key
    assert len(list((tmp_path / "store" / "bundle").iterdir())) == 3  # the public pre-training once, and each released model

    unstored, _ = defense(10.0).pretrain(defense_context(config, load_imagefolder(data.path), cpu, tmp_path / "work"))
    released = load_bundle(first.path)
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(released.named_parameters(), unstored.named_parameters()))


@pytest.mark.filterwarnings("ignore")
def test_private_finetune_with_lora_trains_only_adapters_and_releases_a_plain_model(tmp_path):
    """lora_rank > 0: the DP stage trains LoRA adapters on the attention projections and folds them
    in; the released model has the public model's parameter names, and only those projections moved."""
    from pathlib import Path

    from defenses.private_finetune import PrivateFinetuneSettings
    from s2l_guard.cache import Store
    from s2l_guard.data import load_imagefolder
    from s2l_guard.runner.stages import defense_context, stored_standard_pretrain, testbed_stage

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "smoke.toml").replace(run={"store": str(tmp_path / "store")})
    store, cpu = Store(config.run.store), torch.device("cpu")
    dataset = load_imagefolder(testbed_stage(store, config).path)
    settings = PrivateFinetuneSettings(target_epsilon=1e4, steps=4, batch_size=8, learning_rate=1e-2, lora_rank=2, layers=("attn2.",))
    released, summary = DEFENSES.get("private_finetune")(settings).pretrain(defense_context(config, dataset, cpu, tmp_path / "work", store=store))
    public, _ = stored_standard_pretrain(store, config, dataset, cpu, *dataset.select(membership="public").training_set())
    before, after = dict(public.named_parameters()), dict(released.named_parameters())
    assert set(after) == set(before)  # no adapter left behind
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved and all(".attn2.to_" in n and n.endswith(".weight") for n in moved)
    assert summary["private_trainable_parameters"] < sum(before[n].numel() for n in moved)  # the adapters are smaller than what they move
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        PrivateFinetuneSettings(lora_rank=-1)

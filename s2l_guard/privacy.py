"""DP-SGD training of the denoising loss, through opacus.

:func:`train_private` trains the same per-example DDPM epsilon loss as
:func:`s2l_guard.training.train` (same :func:`~s2l_guard.training.denoising_loss`,
same caption dropout to the empty prompt), but every part that makes it
differentially private is opacus' own (Abadi et al. 2016, "Deep Learning with
Differential Privacy"):

* ``opacus.PrivacyEngine.make_private`` with Poisson sampling over a data
  loader of row indices (each row joins a logical batch independently with
  probability ``sample_rate``),
* per-sample gradients from opacus' hooks on a single ``torch.nn.Module``
  (:class:`DenoisingLossModule`) holding the UNet and, when any of its
  parameters is trained, the text encoder,
* per-sample clipping to ``max_grad_norm`` and Gaussian noise by opacus'
  ``DPOptimizer``; the noise multiplier from
  ``opacus.accountants.utils.get_noise_multiplier`` for the target epsilon,
* ``opacus.utils.batch_memory_manager.BatchMemoryManager`` to split logical
  batches into physical ones (a memory knob only: it does not change the result
  beyond floating-point summation order),
* the epsilon reported by the engine's accountant after training.

The unit of privacy is the *row* of ``images``. The testbed passes a duplicated
member several times; DP then protects each copy, not the image: an image that
appears ``k`` times only gets group privacy for a group of size ``k`` (roughly
``k * epsilon``, with ``delta`` growing too). Rows are never deduplicated here,
because the guarantee must describe the data set actually trained on.

The noise and the Poisson sampling use seeded ``torch.Generator`` s (opacus'
``secure_mode`` is off), so two runs with the same seed are identical. That is
what an audit needs; a deployment that must resist an attacker predicting the
noise would turn ``secure_mode`` on.

Only ``unet.*`` and ``text_encoder.*`` parameters can be trained this way (the
VAE's latents are computed once, outside the private module).

There is no checkpoint/resume: a killed DP run starts over. Resuming would also
need the accountant's state (and the sampler's and noise generator's), and a
resumed run whose accountant lost its history would under-report epsilon.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .errors import ConfigError, S2LError
from .model import Bundle
from .privacy_settings import ACCOUNTANTS, PrivacySettings
from .training import TrainSettings, _freeze_all_but, _in_batches, _set_train_mode, denoising_loss

# What opacus (and torch's hooks) leave on parameters and modules while training privately.
_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad", "autograd_grad_sample_hooks")


@dataclass
class PrivateTrainResult:
    losses: list[float]  # one per logical step: the mean loss of its batch (nan for an empty Poisson batch)
    epsilon: float  # the accountant's epsilon after training, for ``delta``
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    expected_batch_size: int
    # The accountant's own record: (noise_multiplier, sample_rate, steps) entries.
    accountant_history: list[tuple[float, float, int]] = field(default_factory=list)
    ema: EMAModel | None = None  # the weights' moving average (post-processing: no privacy cost)


class DenoisingLossModule(torch.nn.Module):
    """The UNet (and a trained text encoder) as one module: per-example inputs -> per-example losses.

    opacus computes per-sample gradients for the modules inside the one module it is
    given, so every trained component must be a child of this one. A frozen text
    encoder stays outside and runs without gradients.

    ``forward(z0, t, noise, token_ids)`` takes model-space images ``[B, C, H, W]``,
    timesteps ``[B]``, noise like ``z0`` and token ids ``[B, L]`` and returns the
    DDPM epsilon loss of each example ``[B]`` (:func:`~s2l_guard.training.denoising_loss`).
    """

    def __init__(self, bundle: Bundle, *, train_text_encoder: bool) -> None:
        super().__init__()
        self.unet = bundle.unet
        self.text_encoder = bundle.text_encoder if train_text_encoder else None
        self.bundle = bundle  # not a Module: a plain attribute, so frozen parts stay outside
        self.noise_scheduler = DDPMScheduler.from_config(bundle.scheduler.config)

    def forward(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is not None:
            # CLIP's default position ids are one [1, L] row broadcast over the batch; opacus would
            # then record a single, summed "per-sample" gradient for the position embedding.
            positions = torch.arange(token_ids.shape[1], device=token_ids.device).expand(token_ids.shape[0], -1)
            context = self.text_encoder(token_ids, position_ids=positions)[0]
        else:
            with torch.no_grad():
                context = self.bundle.text_encoder(token_ids)[0]
        return denoising_loss(self.bundle, z0, context, t, noise, self.noise_scheduler)


def train_private(
    bundle: Bundle,
    images: torch.Tensor,
    captions: Sequence[str],
    *,
    trainable: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    settings: TrainSettings,
    privacy: PrivacySettings,
    description: str = "dp-train",
    on_step: Callable[[int, float], None] | None = None,
) -> PrivateTrainResult:
    """Train ``trainable`` with DP-SGD (opacus) for exactly ``settings.steps`` logical steps.

    Args:
        bundle: the model; parameters not in ``trainable`` stay bit-identical.
        images: ``[N, C, H, W]`` in [0, 1]. Each row is one unit of privacy: an image
            repeated ``k`` times is protected only as a group of ``k`` (weaker).
        captions: one per image.
        trainable: ``unet.*`` and/or ``text_encoder.*`` parameters, by bundle name.
        optimizer: built over exactly ``trainable.values()``; opacus wraps it.
        settings: ``steps`` (logical steps), ``batch_size`` (expected Poisson batch),
            ``caption_dropout``, ``seed``, ``lr_schedule``/``warmup_steps``, ``ema_decay``.
            ``grad_clip`` is not used (per-sample clipping is ``privacy.max_grad_norm``)
            and ``checkpoint_every`` is ignored: DP runs do not resume.
        privacy: target epsilon, delta, clipping bound, accountant, physical batch size.
        description: names the run in the progress bar and in errors.
        on_step: called with ``(step, loss)`` after each logical step.

    The sampling rate is opacus' ``1 / len(DataLoader(rows, batch_size))``, i.e.
    ``batch_size / N`` when ``batch_size`` divides ``N`` (otherwise slightly less;
    1 when ``batch_size >= N``).

    Raises:
        S2LError: empty data, mismatched captions, untrainable, unknown or stale parameters,
            an optimizer over other parameters, modules opacus cannot compute
            per-sample gradients for, or a loss that is not finite.
        ConfigError: ``delta >= 1 / N``.
    """
    if len(images) == 0:
        raise S2LError(f"{description}: the training set is empty; DP training needs at least one image")
    if len(images) != len(captions):
        raise S2LError(f"training needs one caption per image, got {len(images)} images and {len(captions)} captions")
    if not trainable:
        raise S2LError(f"{description}: nothing to train; pass unet.* or text_encoder.* parameters as trainable")
    other = sorted(name for name in trainable if not name.startswith(("unet.", "text_encoder.")))
    if other:
        raise S2LError(f"{description}: DP training covers unet.* and text_encoder.* parameters only, got {other[:3]}; freeze them")
    if settings.steps < 1 or settings.batch_size < 1:
        raise S2LError(f"{description}: steps and batch_size must be >= 1, got {settings.steps} and {settings.batch_size}")
    n = len(images)
    delta = privacy.delta or 1.0 / (10 * n)
    if delta >= 1.0 / n:
        raise ConfigError(
            f"privacy delta = {delta:g} is not below 1 / N = {1.0 / n:g} for N = {n} training rows; "
            "such a delta allows leaking a whole row - use 0 for 1 / (10 N)"
        )
    known = dict(bundle.named_parameters())
    stale = [name for name, param in trainable.items() if name in known and known[name] is not param]
    if stale:  # e.g. taken before the bundle was copied or moved: they would train nothing the bundle uses
        raise S2LError(f"{description}: trainable {stale[:3]} are not the bundle's own parameters; take them from bundle.named_parameters()")
    own = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if own != {id(p) for p in trainable.values()}:
        raise S2LError(f"{description}: the optimizer must be built over exactly trainable.values()")
    _freeze_all_but(bundle, trainable)  # names unknown parameters
    text_trained = any(name.startswith("text_encoder.") for name in trainable)

    rows = TensorDataset(torch.arange(n))
    loader = DataLoader(rows, batch_size=settings.batch_size, generator=torch.Generator().manual_seed(settings.seed))
    sample_rate = 1.0 / len(loader)  # what make_private's DPDataLoader and accountant use
    noise_multiplier = get_noise_multiplier(
        target_epsilon=privacy.target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=settings.steps,
        accountant=privacy.accountant,
    )

    with torch.no_grad():  # the frozen image side is computed once, as train() does
        latents = _in_batches(bundle.to_model_space, images)
        prompts = sorted(set(captions)) + [""]
        prompt_index = torch.tensor([prompts.index(c) for c in captions])
        token_table = bundle.tokenize(prompts)
    T = DDPMScheduler.from_config(bundle.scheduler.config).config.num_train_timesteps

    bundle.eval()
    wrapper = DenoisingLossModule(bundle, train_text_encoder=text_trained)
    wrapper.training = True  # opacus checks the root only; components follow train()'s rule below
    _set_train_mode(bundle, trainable, True)
    params = list(trainable.values())
    with warnings.catch_warnings():  # secure_mode stays off on purpose: see the module docstring
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=privacy.accountant)
    noise_gen = torch.Generator(device=bundle.device).manual_seed(settings.seed * 1_000_003 + 7)
    module = None
    bar = None
    ema = None
    losses: list[float] = []
    try:
        try:
            module, dp_optimizer, dp_loader = engine.make_private(
                module=wrapper,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=privacy.max_grad_norm,
                poisson_sampling=True,
                noise_generator=noise_gen,
                loss_reduction="mean",
            )
        except (NotImplementedError, ValueError) as exc:
            raise S2LError(_unsupported_message(description, wrapper, exc)) from exc
        expected_batch_size = int(dp_optimizer.expected_batch_size)
        schedule = get_scheduler(settings.lr_schedule, optimizer, num_warmup_steps=settings.warmup_steps,
                                 num_training_steps=settings.steps)  # fmt: skip
        ema = EMAModel(params, decay=settings.ema_decay) if settings.ema_decay else None
        bar = tqdm(total=settings.steps, desc=description, leave=False, disable=None)
        total, count = 0.0, 0
        with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=privacy.physical_batch_size,
                                optimizer=dp_optimizer) as physical:  # fmt: skip
            while len(losses) < settings.steps:
                for (index,) in physical:
                    step = len(losses)
                    if len(index):
                        t, dropped, noise = _draws(settings.seed, step, index, T, settings.caption_dropout, latents.shape[1:])
                        which = torch.where(dropped, len(prompts) - 1, prompt_index[index])
                        batch_losses = module(latents[index], t.to(bundle.device), noise.to(bundle.device), token_table[which])
                        if not torch.isfinite(batch_losses).all():
                            raise S2LError(f"{description}: loss became non-finite at step {step}; lower the learning rate")
                        with warnings.catch_warnings():  # inputs need no grad; the hooks fire on outputs
                            warnings.filterwarnings("ignore", message="Full backward hook is firing")
                            batch_losses.mean().backward()
                        total += batch_losses.sum().item()
                        count += len(index)
                    else:  # an empty Poisson batch: opacus still adds noise and counts the step
                        for p in params:
                            p.grad_sample = p.new_zeros((0, *p.shape))
                    dp_optimizer.step()
                    dp_optimizer.zero_grad(set_to_none=True)
                    if _steps_taken(engine) == step:  # a physical batch inside a logical one
                        continue
                    schedule.step()
                    if ema is not None:
                        ema.step(params)
                    loss = total / count if count else float("nan")
                    total, count = 0.0, 0
                    losses.append(loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if on_step:
                        on_step(step + 1, loss)
                    if len(losses) == settings.steps:
                        break
        epsilon = float(engine.accountant.get_epsilon(delta))
    finally:
        if bar is not None:
            bar.close()
        if module is not None:
            module.to_standard_module()  # opacus removes its hooks and per-sample attributes
        _strip_opacus(wrapper)
        _set_train_mode(bundle, trainable, False)
        for _, param in bundle.named_parameters():
            param.requires_grad_(False)
            param.grad = None
    return PrivateTrainResult(
        losses=losses,
        epsilon=epsilon,
        delta=delta,
        noise_multiplier=float(noise_multiplier),
        sample_rate=sample_rate,
        steps=_steps_taken(engine),
        accountant=privacy.accountant,
        expected_batch_size=expected_batch_size,
        accountant_history=[tuple(entry) for entry in engine.accountant.history],
        ema=ema,
    )


def _steps_taken(engine) -> int:
    """Logical steps the engine's accountant has recorded (its history merges equal steps)."""
    return sum(int(entry[-1]) for entry in engine.accountant.history)


def _example_generator(seed: int, step: int, row: int) -> torch.Generator:
    """The generator of one row's draws at one logical step.

    Keyed by the row, not by its position in a physical batch, so the physical
    batch size (a memory knob) does not change what is drawn.
    """
    key = hashlib.blake2b(f"{seed}/{step}/{row}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


def _draws(seed: int, step: int, index: torch.Tensor, T: int, caption_dropout: float, shape) -> tuple:
    """Timestep, caption-dropout flag and noise of each row in ``index`` (as train() draws them)."""
    t, dropped, noise = [], [], []
    for row in index.tolist():
        g = _example_generator(seed, step, row)
        t.append(torch.randint(0, T, (1,), generator=g))
        dropped.append(torch.rand(1, generator=g) < caption_dropout)
        noise.append(torch.randn((1, *shape), generator=g))
    return torch.cat(t), torch.cat(dropped), torch.cat(noise)


def _unsupported_message(description: str, wrapper: torch.nn.Module, exc: Exception) -> str:
    """One line naming the modules opacus refused and what to do about them."""
    names = []
    for name, module in trainable_modules(wrapper):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if list(module.buffers()) or (validator is not None and validator(module)):
            names.append(f"{name} ({type(module).__name__})")
    cause = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    what = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") if names else "the model"
    return (
        f"{description}: opacus cannot compute per-sample gradients for {what} ({cause}); "
        "leave those parameters out of trainable, or replace the module (opacus.validators.ModuleValidator.fix)"
    )


def _strip_opacus(wrapper: torch.nn.Module) -> None:
    """Remove whatever opacus left on the modules and parameters, even after a failure."""
    for module in wrapper.modules():
        for attr in _MODULE_ATTRS:
            if attr in module.__dict__:
                delattr(module, attr)
        if not module._backward_hooks and getattr(module, "_is_full_backward_hook", None):
            module._is_full_backward_hook = None  # torch's flag from register_full_backward_hook
        for param in module.parameters(recurse=False):
            for attr in _PARAM_ATTRS:
                if hasattr(param, attr):
                    delattr(param, attr)


__all__ = ["PrivacySettings", "PrivateTrainResult", "DenoisingLossModule", "train_private", "ACCOUNTANTS"]

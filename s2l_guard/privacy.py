"""DP-SGD training of the denoising loss, through opacus: hooks on the one training loop.

:func:`train_private` is :func:`s2l_guard.training.train` with :class:`DPHooks`:
the same loop, the same per-example DDPM epsilon loss
(:func:`~s2l_guard.training.denoising_loss`, caption dropout to the empty
prompt), the same LR schedule, EMA and ``on_step`` callback. The hooks swap in
what makes a step differentially private, all of it opacus' own (Abadi et al.
2016, "Deep Learning with Differential Privacy"):

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
  beyond floating-point summation order); each row's timestep, caption dropout
  and noise come from a generator keyed by (seed, step, row) (:func:`_draws`),
  not by its place in a physical batch,
* the epsilon reported by the engine's accountant after training,
* *noise multiplicity* (``noise_multiplicity = K``, Dockhorn et al. 2023, "Differentially
  Private Diffusion Models"): each row is denoised at K timesteps and noises in one forward pass,
  and its K per-sample gradients are averaged before opacus clips them, so each example still
  contributes one clipped gradient (the accountant's unit) that is K times less noisy.

``TrainSettings.grad_clip`` is not used (the DP optimizer clips each example's
gradient instead), and DP-SGD takes no prior preservation.

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

There is no checkpoint/resume (``DPHooks.resumable`` is false, so ``train``
refuses a ``checkpoint_dir``): a killed DP run starts over. Resuming would also
need the accountant's state (and the sampler's and noise generator's), and a
resumed run whose accountant lost its history would under-report epsilon.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Callable, Iterator, Mapping, Sequence

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from . import gradient_canaries
from .errors import ConfigError, S2LError
from .model import Bundle
from .privacy_settings import ACCOUNTANTS, PrivacySettings
from .training import Batch, Run, TrainHooks, TrainResult, TrainSettings, _set_train_mode, denoising_loss, train

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
            positions = torch.arange(token_ids.shape[1], device=token_ids.device).repeat(token_ids.shape[0], 1)  # contiguous: ghost clipping views it
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

    :func:`s2l_guard.training.train` with :class:`DPHooks`, plus the privacy it spent.

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
    hooks = DPHooks(privacy)
    trained = train(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=settings, on_step=on_step,
                    description=description, hooks=hooks)  # fmt: skip
    return hooks.result(trained)


class DPHooks(TrainHooks):
    """DP-SGD steps for :func:`s2l_guard.training.train` (see the module docstring); one object per run.

    ``start`` makes the model and optimizer private (opacus' ``make_private``, Poisson
    sampling over the row indices, ``BatchMemoryManager``); each logical step's
    ``batches`` are its physical batches, with per-row draws (:func:`_draws`); ``finish``
    strips opacus off the model again; :meth:`result` reads the accountant.
    """

    resumable = False  # resuming would need the accountant's, the sampler's and the noise generator's state too
    clips_batch_gradient = False  # the DP optimizer clips each example's gradient to privacy.max_grad_norm instead

    def __init__(self, privacy: PrivacySettings) -> None:
        self.privacy = privacy
        self.ghost = privacy.grad_sample_mode == "ghost"
        self.delta = 0.0
        self.wrapper: DenoisingLossModule | None = None
        self.module = None  # opacus' GradSampleModule around the wrapper
        self.engine: PrivacyEngine | None = None
        self._exit = ExitStack()  # the warning filters and the physical-batch loader, closed by finish()

    def check(self, bundle, images, captions, *, trainable, optimizer, settings, description) -> None:
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
        self.delta = self.privacy.delta or 1.0 / (10 * n)
        if self.delta >= 1.0 / n:
            raise ConfigError(
                f"privacy delta = {self.delta:g} is not below 1 / N = {1.0 / n:g} for N = {n} training rows; "
                "such a delta allows leaking a whole row - use 0 for 1 / (10 N)"
            )
        known = dict(bundle.named_parameters())
        stale = [name for name, param in trainable.items() if name in known and known[name] is not param]
        if stale:  # e.g. taken before the bundle was copied or moved: they would train nothing the bundle uses
            raise S2LError(f"{description}: trainable {stale[:3]} are not the bundle's own parameters; take them from bundle.named_parameters()")
        own = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if own != {id(p) for p in trainable.values()}:
            raise S2LError(f"{description}: the optimizer must be built over exactly trainable.values()")

    def start(self, run: Run, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        s, bundle = run.settings, run.bundle
        if run.prior is not None:
            raise S2LError(f"{run.description}: DP training takes no prior preservation; pass prior=None")
        rows = TensorDataset(torch.arange(len(run.images)))
        loader = DataLoader(rows, batch_size=s.batch_size, generator=torch.Generator().manual_seed(s.seed))
        self.sample_rate = 1.0 / len(loader)  # what make_private's DPDataLoader and accountant use
        if math.isinf(self.privacy.target_epsilon):  # the frontier's reference point: the same recipe, clipped, without noise
            self.noise_multiplier = 0.0
        else:
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.privacy.target_epsilon,
                target_delta=self.delta,
                sample_rate=self.sample_rate,
                steps=s.steps,
                accountant=self.privacy.accountant,
            )
        self.tokens = bundle.tokenize(run.prompts)  # the wrapper encodes captions itself: a trained text encoder needs per-example gradients
        bundle.eval()
        self.wrapper = DenoisingLossModule(bundle, train_text_encoder=any(name.startswith("text_encoder.") for name in run.trainable))
        self.wrapper.training = True  # opacus checks the root only; components follow train()'s rule below
        _set_train_mode(bundle, run.trainable, True)
        self._exit.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # off on purpose: see the module docstring
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # inputs need no grad; the hooks fire on outputs
        self.engine = PrivacyEngine(accountant=self.privacy.accountant)
        noise_gen = torch.Generator(device=bundle.device).manual_seed(s.seed * 1_000_003 + 7)
        try:
            made = self.engine.make_private(
                module=self.wrapper,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.privacy.max_grad_norm,
                poisson_sampling=True,
                noise_generator=noise_gen,
                grad_sample_mode=self.privacy.grad_sample_mode,
                loss_reduction="mean",
            )
        except (NotImplementedError, ValueError) as exc:
            raise S2LError(_unsupported_message(run.description, self.wrapper, exc)) from exc
        if self.ghost:  # its loss wrapper is not needed: backward() wraps the per-example losses itself
            self.module, dp_optimizer, _, dp_loader = made
        else:
            self.module, dp_optimizer, dp_loader = made
        self.dp_optimizer = dp_optimizer
        self.expected_batch_size = int(dp_optimizer.expected_batch_size)
        if self.privacy.noise_multiplicity > 1:
            _average_draws_before_clipping(dp_optimizer, self.privacy.noise_multiplicity)
        gradient_canaries.attach_active(dp_optimizer, sample_rate=self.sample_rate)  # an audit's canaries, when one is recording
        physical = self._exit.enter_context(
            BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=self.privacy.physical_batch_size, optimizer=dp_optimizer)
        )
        self._physical = chain.from_iterable(repeat(physical))  # a new Poisson pass over the rows whenever one ends
        return dp_optimizer

    def batches(self, run: Run, step: int) -> Iterator[Batch | None]:
        """The physical batches of logical step ``step``, until the DP optimizer has taken it (the accountant counts it)."""
        while True:
            (index,) = next(self._physical)
            if len(index):
                yield self._batch(run, step, index)
            else:  # an empty Poisson batch: opacus still adds noise and counts the step, from empty per-sample gradients
                for p in run.params:
                    if self.ghost:  # ghost clipping accumulates p.grad, the clipped sum, instead
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                yield None
            if _steps_taken(self.engine) > step:
                return

    def _batch(self, run: Run, step: int, index: torch.Tensor) -> Batch:
        """The rows of ``index``, each repeated for its ``noise_multiplicity`` draws (row-major: a row's draws together)."""
        s, draws = run.settings, self.privacy.noise_multiplicity
        t, dropped, noise = _draws(s.seed, step, index, run.T, s.caption_dropout, run.latents.shape[1:], draws)
        rows = index.repeat_interleave(draws)
        which = torch.where(dropped, len(run.prompts) - 1, run.prompt_index[rows])
        return Batch(run.latents[rows], t, noise.to(run.bundle.device), which, len(rows))

    def losses(self, run: Run, batch: Batch) -> torch.Tensor:
        return self.module(batch.z0, batch.t.to(run.bundle.device), batch.noise, self.tokens[batch.which])

    def backward(self, loss: torch.Tensor, losses: torch.Tensor) -> None:
        """Hooks and functorch: one backward pass, per-sample gradients from opacus' hooks. Ghost
        clipping: opacus' two passes, per-sample gradient norms first, then the loss with each
        example weighted by its clipping factor, whose gradient is the clipped sum."""
        if self.ghost:
            DPTensorFastGradientClipping(self.module, self.dp_optimizer, losses, loss_reduction="mean").backward()
        else:
            loss.backward()

    def step_loss(self, objective: float, total: float, count: int) -> float:
        """The mean loss of the logical batch's rows (over all its physical batches); nan for an empty one."""
        return total / count if count else float("nan")

    def finish(self, run: Run) -> None:
        self._exit.close()
        if self.module is not None:
            self.module.to_standard_module()  # opacus removes its hooks and per-sample attributes
        if self.wrapper is not None:
            _strip_opacus(self.wrapper)

    def result(self, trained: TrainResult) -> PrivateTrainResult:
        """What the run trained and the privacy it spent, by the engine's accountant."""
        return PrivateTrainResult(
            losses=trained.losses,
            epsilon=float(self.engine.accountant.get_epsilon(self.delta)) if self.noise_multiplier else math.inf,
            delta=self.delta,
            noise_multiplier=float(self.noise_multiplier),
            sample_rate=self.sample_rate,
            steps=_steps_taken(self.engine),
            accountant=self.privacy.accountant,
            expected_batch_size=self.expected_batch_size,
            accountant_history=[tuple(entry) for entry in self.engine.accountant.history],
            ema=trained.ema,
        )


def _steps_taken(engine) -> int:
    """Logical steps the engine's accountant has recorded (its history merges equal steps)."""
    return sum(int(entry[-1]) for entry in engine.accountant.history)


def _example_generator(seed: int, step: int, row: int, draw: int = 0) -> torch.Generator:
    """The generator of one row's ``draw``-th draws at one logical step.

    Keyed by the row, not by its position in a physical batch, so the physical
    batch size (a memory knob) does not change what is drawn; the first draw keeps
    the key of a run with one draw per row.
    """
    key = hashlib.blake2b(f"{seed}/{step}/{row}{f'/{draw}' if draw else ''}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


def _draws(seed: int, step: int, index: torch.Tensor, T: int, caption_dropout: float, shape, draws: int = 1) -> tuple:
    """Timestep, caption-dropout flag and noise of each row in ``index``, ``draws`` of each per row, a row's together."""
    t, dropped, noise = [], [], []
    for row in index.tolist():
        for draw in range(draws):
            g = _example_generator(seed, step, row, draw)
            t.append(torch.randint(0, T, (1,), generator=g))
            dropped.append(torch.rand(1, generator=g) < caption_dropout)
            noise.append(torch.randn((1, *shape), generator=g))
    return torch.cat(t), torch.cat(dropped), torch.cat(noise)


def _average_draws_before_clipping(optimizer, draws: int) -> None:
    """Make ``optimizer`` (opacus' DPOptimizer) average each example's ``draws`` per-sample
    gradients into one before it clips: the clipped unit stays the example, as the accountant assumes."""
    clip_and_accumulate = optimizer.clip_and_accumulate

    def average_then_clip() -> None:
        for p in optimizer.params:
            sample = p.grad_sample if isinstance(p.grad_sample, torch.Tensor) else torch.cat(p.grad_sample)
            p.grad_sample = sample.reshape(len(sample) // draws, draws, *sample.shape[1:]).mean(1)
        clip_and_accumulate()

    optimizer.clip_and_accumulate = average_then_clip


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


__all__ = ["PrivacySettings", "PrivateTrainResult", "DenoisingLossModule", "DPHooks", "train_private", "ACCOUNTANTS"]

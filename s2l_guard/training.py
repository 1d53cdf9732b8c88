"""The one denoising-loss training loop: pre-training, every fine-tune method and DP-SGD.

The loss is DDPM's epsilon objective (Ho et al. 2020, eq. 14):
``L = || eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, c) ||^2``
with ``t`` uniform and the caption ``c`` replaced by the empty prompt with
probability ``caption_dropout`` so the model also learns the unconditional
score classifier-free guidance needs (Ho & Salimans 2022).

DreamBooth's prior preservation (Ruiz et al. 2023, eq. 2) adds
``weight * L(class batch)``: every step also denoises a batch of generic class
images under the class prompt, so the model keeps what the class looks like.

Every random draw of step ``s`` comes from a generator seeded with
``(seed, s)``, so a run resumed from a checkpoint continues exactly as an
uninterrupted run would.

:func:`train` writes the step once: losses, finite check, backward, optimizer
step, LR schedule, ``after_step``, EMA, logged loss, progress bar, checkpoint,
``on_step``. What differs between kinds of training is a :class:`TrainHooks`
object: which examples a step sees and how their losses are computed, which
optimizer takes the step, and what is set up before and torn down after. The
default hooks are plain minibatch training (uniform batches with replacement,
the batch gradient clipped to ``grad_clip``, resumable checkpoints);
:class:`s2l_guard.privacy.DPHooks` makes the same loop DP-SGD.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .cache import atomic_write_bytes
from .errors import S2LError
from .model import Bundle

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainSettings:
    """How long and how to train; the optimizer and trainable parameters are separate inputs."""

    steps: int
    batch_size: int
    caption_dropout: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm; None disables clipping
    seed: int = 0
    checkpoint_every: int = 0  # 0: never checkpoint
    lr_schedule: str = "constant"  # a diffusers.optimization schedule name ("cosine", "linear", ...)
    warmup_steps: int = 0
    ema_decay: float = 0.0  # > 0: keep diffusers' EMAModel of the trainable weights (TrainResult.ema)


@dataclass(frozen=True)
class PriorPreservation:
    """DreamBooth's class-specific prior-preservation term, added to every step's loss."""

    images: torch.Tensor  # [M, C, H, W] in [0, 1]: generic images of the class
    caption: str  # the class prompt, e.g. "a handwritten digit"
    weight: float = 1.0  # lambda in the paper; 0 trains exactly as without the term


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per step, including resumed ones
    resumed_from: int = 0  # the step the run picked up at (0: from scratch)
    ema: EMAModel | None = None  # the weights' moving average, when TrainSettings.ema_decay > 0


@dataclass
class Run:
    """What :func:`train` prepared before the first step; hooks read it."""

    bundle: Bundle
    images: torch.Tensor  # [N, C, H, W] in [0, 1]
    trainable: Mapping[str, torch.nn.Parameter]
    settings: TrainSettings
    description: str
    prior: PriorPreservation | None  # None also when its weight is 0
    noise_scheduler: DDPMScheduler
    latents: torch.Tensor | None  # the images in model space, computed once; None when the VAE trains
    class_latents: torch.Tensor | None  # the prior's images in model space, likewise
    prompts: list[str]  # every caption (and the class prompt), sorted, then "" for a dropped caption
    prompt_index: torch.Tensor  # [N]: each image's caption in ``prompts``
    contexts: torch.Tensor | None  # ``prompts`` through the text encoder, computed once; None when it trains

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.trainable.values())

    @property
    def T(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps


@dataclass(frozen=True)
class Batch:
    """The examples of one forward pass: the first ``instances`` are training rows, the rest prior-preservation class images."""

    z0: torch.Tensor  # [B, C, H, W] in model space, on the device
    t: torch.Tensor  # [B] timesteps
    noise: torch.Tensor  # like z0, on the device
    which: torch.Tensor  # [B] each example's prompt in Run.prompts (a dropped caption is the last, "")
    instances: int


class TrainHooks:
    """How :func:`train` takes its steps. This base class is plain training; ``privacy.DPHooks`` is DP-SGD.

    One object serves one run. :func:`train` calls ``check`` first, ``start`` before the
    first step, ``batches`` and ``losses`` in every step, and ``finish`` at the end, also
    after a failure (even one inside ``start``).
    """

    resumable = True  # a checkpoint (weights, optimizer, LR schedule, EMA) continues the run bit-for-bit
    clips_batch_gradient = True  # clip the batch gradient to settings.grad_clip before each optimizer step

    def check(self, bundle: Bundle, images: torch.Tensor, captions: Sequence[str], *, trainable: Mapping[str, torch.nn.Parameter],
              optimizer: torch.optim.Optimizer, settings: TrainSettings, description: str) -> None:  # fmt: skip
        """Refuse, with a one-line S2LError, inputs this kind of training cannot use; before train()'s own checks."""

    def start(self, run: Run, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Set up before the first step; returns the optimizer that takes the steps."""
        return optimizer

    def batches(self, run: Run, step: int) -> Iterator[Batch | None]:
        """The batches of one step, each followed by an optimizer step; plain training has one.

        ``None`` is a batch without examples (DP's empty Poisson batch): no loss, but still a step.
        """
        yield _uniform_batch(run, step)

    def losses(self, run: Run, batch: Batch) -> torch.Tensor:
        """The per-example denoising loss ``[B]`` of a batch."""
        bundle = run.bundle
        context = run.contexts[batch.which] if run.contexts is not None else bundle.encode_prompts([run.prompts[i] for i in batch.which])
        return denoising_loss(bundle, batch.z0, context, batch.t.to(bundle.device), batch.noise, run.noise_scheduler)

    def backward(self, loss: torch.Tensor, losses: torch.Tensor) -> None:
        """Backpropagate the batch objective ``loss`` (``losses``: its per-example terms)."""
        loss.backward()

    def step_loss(self, objective: float, total: float, count: int) -> float:
        """The loss a step logs: here the objective it minimised (instance plus weighted class loss).

        ``total`` and ``count`` are the sum and number of the step's training-row losses.
        """
        return objective

    def finish(self, run: Run) -> None:
        """Undo what ``start`` did."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator behind every random draw of one training step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def denoising_loss(bundle: Bundle, z0: torch.Tensor, context: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, noise_scheduler) -> torch.Tensor:
    """Per-example epsilon-prediction loss ``[N]`` (mean squared error over each example)."""
    noisy = noise_scheduler.add_noise(z0, noise, t)
    prediction = bundle.unet(noisy, t, context).sample
    return F.mse_loss(prediction, noise, reduction="none").flatten(1).mean(1)


def train(
    bundle: Bundle,
    images: torch.Tensor,
    captions: Sequence[str],
    *,
    trainable: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    settings: TrainSettings,
    checkpoint_dir: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    description: str = "train",
    prior: PriorPreservation | None = None,
    after_step: Callable[[], None] | None = None,
    hooks: TrainHooks | None = None,
) -> TrainResult:
    """Train ``trainable`` (named as in :meth:`Bundle.named_parameters`) on images in [0, 1].

    Args:
        bundle: the model; parameters not in ``trainable`` stay frozen.
        images: ``[N, C, H, W]`` in [0, 1], repeated as often as each should be seen.
        captions: one per image.
        trainable: the parameters to optimise, by bundle name.
        optimizer: built over exactly ``trainable.values()``.
        settings: steps, batch size, caption dropout, clipping, seed, checkpointing.
        checkpoint_dir: where to keep a resumable checkpoint; a run finds and resumes it.
        on_step: called with ``(step, loss)`` after each optimiser step.
        description: names the run in the progress bar and in errors.
        prior: DreamBooth prior preservation; each step adds ``prior.weight`` times the
            denoising loss of a batch of ``prior.images`` drawn from the same step generator.
        after_step: called right after each optimiser step, before checkpointing (e.g. to
            restore embedding rows a method must not change).
        hooks: how steps are taken; ``None`` is plain training (:class:`TrainHooks`).

    The bundle comes back frozen (no parameter requires or holds a gradient) and in eval
    mode where it trained, also after a failure.

    Raises:
        S2LError: on empty data, mismatched captions, class images shaped unlike the
            images, or a loss that is not finite; whatever ``hooks.check`` refuses.
    """
    hooks = hooks if hooks is not None else TrainHooks()
    hooks.check(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=settings, description=description)
    if len(images) == 0 or len(images) != len(captions):
        raise S2LError(f"training needs one caption per image, got {len(images)} images and {len(captions)} captions")
    if checkpoint_dir and not hooks.resumable:
        raise S2LError(f"{description}: this training cannot resume from a checkpoint; pass no checkpoint_dir")
    # Weight 0 skips the class batch entirely, so it trains bit-for-bit as without a prior.
    prior = prior if prior is not None and prior.weight != 0 else None
    if prior is not None and (len(prior.images) == 0 or prior.images.shape[1:] != images.shape[1:]):
        raise S2LError(
            f"prior preservation needs class images shaped like the images {tuple(images.shape[1:])}, "
            f"got {tuple(prior.images.shape)}; generate them with the same model"
        )
    run = _prepare(bundle, images, captions, trainable, settings, description, prior)
    result = TrainResult()
    bar = None
    try:
        stepper = hooks.start(run, optimizer)
        schedule = get_scheduler(settings.lr_schedule, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.steps)
        # Stable Diffusion's LitEma warm-up, min(decay, (1 + step) / (10 + step)), is EMAModel's default.
        result.ema = EMAModel(run.params, decay=settings.ema_decay) if settings.ema_decay else None
        start = _resume(checkpoint_dir, trainable, optimizer, schedule, result)
        _set_train_mode(bundle, trainable, True)
        bar = tqdm(range(start, settings.steps), desc=description, initial=start, total=settings.steps, leave=False, disable=None)
        stepper.zero_grad(set_to_none=True)  # every batch's optimizer step clears the gradients; the first batch starts likewise
        for step in bar:
            loss = _take_step(run, hooks, stepper, step)
            schedule.step()
            if after_step:
                after_step()
            if result.ema is not None:
                result.ema.step(run.params)
            result.losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            done = step + 1
            if checkpoint_dir and settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < settings.steps:
                _save_checkpoint(Path(checkpoint_dir), done, trainable, optimizer, schedule, result)
            if on_step:
                on_step(done, loss)
    finally:
        if bar is not None:
            bar.close()
        hooks.finish(run)
        _set_train_mode(bundle, trainable, False)
        for _, param in bundle.named_parameters():
            param.requires_grad_(False)
            param.grad = None
    return result


def _take_step(run: Run, hooks: TrainHooks, optimizer: torch.optim.Optimizer, step: int) -> float:
    """One step: for each of its batches a forward pass, a backward pass and an optimizer step; returns the loss to log.

    A plain step has one batch. A DP step is a Poisson batch split into physical batches
    (a memory bound): the DP optimizer only accumulates clipped per-example gradients until
    the last, then noises them and updates the weights. An empty Poisson batch comes as
    ``None``: no loss, yet DP-SGD still takes (and counts) its noise-only step.
    """
    objective, total, count = float("nan"), 0.0, 0
    for batch in hooks.batches(run, step):
        if batch is not None:
            losses = hooks.losses(run, batch)
            loss = losses[: batch.instances].mean()
            if run.prior is not None:
                loss = loss + run.prior.weight * losses[batch.instances :].mean()
            if not torch.isfinite(loss):
                raise S2LError(f"{run.description}: loss became {loss.item()} at step {step}; lower the learning rate")
            hooks.backward(loss, losses)
            objective = loss.item()
            total += losses[: batch.instances].sum().item()
            count += batch.instances
        if run.settings.grad_clip and hooks.clips_batch_gradient:
            torch.nn.utils.clip_grad_norm_(run.params, run.settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return hooks.step_loss(objective, total, count)


def _prepare(bundle: Bundle, images, captions, trainable, settings: TrainSettings, description: str, prior: PriorPreservation | None) -> Run:
    """Freeze all but ``trainable`` and compute once what frozen components would compute every step."""
    _freeze_all_but(bundle, trainable)
    text_trained = any(name.startswith("text_encoder.") for name in trainable)
    vae_trained = any(name.startswith("vae.") for name in trainable)
    with torch.no_grad():
        latents = None if vae_trained else _in_batches(bundle.to_model_space, images)
        class_latents = None if vae_trained or prior is None else _in_batches(bundle.to_model_space, prior.images)
        prompts = sorted(set(captions) | ({prior.caption} if prior else set())) + [""]
        prompt_index = torch.tensor([prompts.index(c) for c in captions])
        contexts = None if text_trained else bundle.encode_prompts(prompts)
    noise_scheduler = DDPMScheduler.from_config(bundle.scheduler.config)
    return Run(bundle=bundle, images=images, trainable=trainable, settings=settings, description=description, prior=prior,
               noise_scheduler=noise_scheduler, latents=latents, class_latents=class_latents, prompts=prompts,
               prompt_index=prompt_index, contexts=contexts)  # fmt: skip


def _uniform_batch(run: Run, step: int) -> Batch:
    """Plain training's batch: rows uniform with replacement, then prior preservation's class rows, all from the step's generator."""
    s, bundle = run.settings, run.bundle
    g = step_generator(s.seed, step)
    index = torch.randint(len(run.images), (s.batch_size,), generator=g)
    t = torch.randint(0, run.T, (s.batch_size,), generator=g)
    dropped = torch.rand(s.batch_size, generator=g) < s.caption_dropout
    z0 = run.latents[index] if run.latents is not None else bundle.to_model_space(run.images[index])
    noise = torch.randn(z0.shape, generator=g).to(bundle.device)
    which = torch.where(dropped, len(run.prompts) - 1, run.prompt_index[index])
    if run.prior is not None:  # one forward pass over instance and class examples together
        class_z0, class_t, class_noise = _class_batch(bundle, run.prior, run.class_latents, s.batch_size, run.T, g)
        z0, t, noise = torch.cat([z0, class_z0]), torch.cat([t, class_t]), torch.cat([noise, class_noise])
        which = torch.cat([which, torch.full((s.batch_size,), run.prompts.index(run.prior.caption))])
    return Batch(z0, t, noise, which, s.batch_size)


def _class_batch(bundle: Bundle, prior: PriorPreservation, class_latents, size: int, T: int, g: torch.Generator):
    """Prior preservation's class examples ``(z0, t, noise)``, drawn after the instance batch's."""
    index = torch.randint(len(prior.images), (size,), generator=g)
    t = torch.randint(0, T, (size,), generator=g)
    z0 = class_latents[index] if class_latents is not None else bundle.to_model_space(prior.images[index])
    return z0, t, torch.randn(z0.shape, generator=g).to(bundle.device)


def _freeze_all_but(bundle: Bundle, trainable: Mapping[str, torch.nn.Parameter]) -> None:
    known = dict(bundle.named_parameters())
    unknown = [name for name in trainable if name not in known]
    if unknown:
        raise S2LError(f"trainable parameters {unknown[:3]} are not in the bundle; name them as Bundle.named_parameters() does")
    for name, param in known.items():
        param.requires_grad_(name in trainable)


def _set_train_mode(bundle: Bundle, trainable: Mapping[str, torch.nn.Parameter], mode: bool) -> None:
    for prefix, module in bundle.modules().items():
        if any(name.startswith(prefix + ".") for name in trainable):
            module.train(mode)


def _in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = 512) -> torch.Tensor:
    return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


def _save_checkpoint(folder: Path, step: int, trainable, optimizer, schedule, result: TrainResult) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "params": {name: p.detach().cpu() for name, p in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "lr_schedule": schedule.state_dict(),
        "losses": torch.tensor(result.losses),
    }
    if result.ema is not None:
        state["ema"] = result.ema.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(folder / CHECKPOINT, buffer.getvalue())


def _resume(folder, trainable, optimizer, schedule, result: TrainResult) -> int:
    path = Path(folder) / CHECKPOINT if folder else None
    if path is None or not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)  # our own file; still no pickle code
    if set(state["params"]) != set(trainable):
        raise S2LError(f"{path} was written for other trainable parameters; delete it to start over")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    if "lr_schedule" in state:  # checkpoints from before schedules existed ran a constant rate
        schedule.load_state_dict(state["lr_schedule"])
    if result.ema is not None:
        if "ema" not in state:
            raise S2LError(f"{path} holds no EMA of the weights but this run keeps one; delete it to start over")
        result.ema.load_state_dict(state["ema"])
    result.losses = state["losses"].tolist()
    result.resumed_from = int(state["step"])
    return result.resumed_from


@torch.no_grad()
def denoising_losses(
    bundle: Bundle,
    images: torch.Tensor,
    captions: Sequence[str],
    *,
    timesteps: Sequence[int],
    draws: int,
    seed: int,
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean denoising loss ``[N]`` of each image over fixed timesteps and seeded noise draws.

    The noise of image ``i`` does not depend on the batch size, so scores are reproducible.
    """
    noise_scheduler = DDPMScheduler.from_config(bundle.scheduler.config)
    z0 = _in_batches(bundle.to_model_space, images)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(z0), len(timesteps), draws) + tuple(z0.shape[1:]), generator=g).to(bundle.device)
    prompts = sorted(set(captions))
    contexts = bundle.encode_prompts(prompts)
    context = contexts[torch.tensor([prompts.index(c) for c in captions])]
    total = torch.zeros(len(z0), device=bundle.device)
    for i in range(0, len(z0), batch_size):
        part = slice(i, i + batch_size)
        n = len(z0[part])
        for j, step in enumerate(timesteps):
            t = torch.full((n,), int(step), device=bundle.device)
            for d in range(draws):
                total[part] += denoising_loss(bundle, z0[part], context[part], t, noise[part, j, d], noise_scheduler)
    return (total / (len(timesteps) * draws)).cpu()


def pretrain_trainable(bundle, config) -> dict[str, torch.nn.Parameter]:
    """What pre-training trains: the UNet, and the text encoder if [pretrain] says so."""
    train_text = config.pretrain.train_text_encoder
    return {n: q for n, q in bundle.named_parameters() if n.startswith("unet.") or (train_text and n.startswith("text_encoder."))}

"""One denoising-loss training loop for pre-training, every fine-tune method and DP training.

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
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

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

    Raises:
        S2LError: on empty data, mismatched captions, class images shaped unlike the
            images, or a loss that is not finite.
    """
    if len(images) == 0 or len(images) != len(captions):
        raise S2LError(f"training needs one caption per image, got {len(images)} images and {len(captions)} captions")
    # Weight 0 skips the class batch entirely, so it trains bit-for-bit as without a prior.
    prior = prior if prior is not None and prior.weight != 0 else None
    if prior is not None and (len(prior.images) == 0 or prior.images.shape[1:] != images.shape[1:]):
        raise S2LError(
            f"prior preservation needs class images shaped like the images {tuple(images.shape[1:])}, "
            f"got {tuple(prior.images.shape)}; generate them with the same model"
        )
    _freeze_all_but(bundle, trainable)
    params = list(trainable.values())
    text_trained = any(name.startswith("text_encoder.") for name in trainable)
    vae_trained = any(name.startswith("vae.") for name in trainable)
    noise_scheduler = DDPMScheduler.from_config(bundle.scheduler.config)
    T = noise_scheduler.config.num_train_timesteps

    with torch.no_grad():  # cache what frozen components compute once
        latents = None if vae_trained else _in_batches(bundle.to_model_space, images)
        class_latents = None if vae_trained or prior is None else _in_batches(bundle.to_model_space, prior.images)
        prompts = sorted(set(captions) | ({prior.caption} if prior else set())) + [""]
        prompt_index = torch.tensor([prompts.index(c) for c in captions])
        contexts = None if text_trained else bundle.encode_prompts(prompts)

    result = TrainResult()
    schedule = get_scheduler(settings.lr_schedule, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.steps)
    # Stable Diffusion's LitEma warm-up, min(decay, (1 + step) / (10 + step)), is EMAModel's default.
    result.ema = EMAModel(params, decay=settings.ema_decay) if settings.ema_decay else None
    start = _resume(checkpoint_dir, trainable, optimizer, schedule, result)
    _set_train_mode(bundle, trainable, True)
    bar = tqdm(range(start, settings.steps), desc=description, initial=start, total=settings.steps, leave=False, disable=None)
    try:
        for step in bar:
            g = step_generator(settings.seed, step)
            index = torch.randint(len(images), (settings.batch_size,), generator=g)
            t = torch.randint(0, T, (settings.batch_size,), generator=g)
            dropped = torch.rand(settings.batch_size, generator=g) < settings.caption_dropout
            z0 = latents[index] if latents is not None else bundle.to_model_space(images[index])
            noise = torch.randn(z0.shape, generator=g).to(bundle.device)
            which = torch.where(dropped, len(prompts) - 1, prompt_index[index])
            if prior is not None:  # one forward pass over instance and class examples together
                class_z0, class_t, class_noise = _class_batch(bundle, prior, class_latents, settings.batch_size, T, g)
                z0, t, noise = torch.cat([z0, class_z0]), torch.cat([t, class_t]), torch.cat([noise, class_noise])
                which = torch.cat([which, torch.full((settings.batch_size,), prompts.index(prior.caption))])
            context = contexts[which] if contexts is not None else bundle.encode_prompts([prompts[i] for i in which])
            losses = denoising_loss(bundle, z0, context, t.to(bundle.device), noise, noise_scheduler)
            loss = losses[: settings.batch_size].mean()
            if prior is not None:
                loss = loss + prior.weight * losses[settings.batch_size :].mean()
            if not torch.isfinite(loss):
                raise S2LError(f"{description}: loss became {loss.item()} at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            schedule.step()
            if after_step:
                after_step()
            if result.ema is not None:
                result.ema.step(params)
            result.losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
            done = step + 1
            if checkpoint_dir and settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < settings.steps:
                _save_checkpoint(Path(checkpoint_dir), done, trainable, optimizer, schedule, result)
            if on_step:
                on_step(done, loss.item())
    finally:
        bar.close()
        _set_train_mode(bundle, trainable, False)
    for _, param in bundle.named_parameters():
        param.requires_grad_(False)
    return result


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

"""Plumbing every white-box membership inference attack here shares.

Input checks, model-space batches, the noise schedule and one noise
prediction: SecMI, PIA and the loss attack all score images this way.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from diffusers import DDPMScheduler

from s2l_guard.errors import BundleError, InputError, SettingsError
from s2l_guard.model import Bundle


def check_inputs(bundle: Bundle, images: torch.Tensor, captions: Sequence[str], batch_size: int) -> None:
    """Raise ``ValueError`` naming the problem and the fix when the inputs cannot be scored.

    Args:
        bundle: the model the images will be scored against.
        images: should be ``[N, C, H, W]`` in [0, 1], ``C`` the bundle's channel count
            (or 1 for a bundle with a VAE, which repeats grey images over its channels).
        captions: should hold one caption per image.
        batch_size: should be at least 1.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise InputError(f"images must be a [N, C, H, W] tensor, got {_describe(images)}; stack them with torch.stack")
    if len(captions) != len(images):
        raise InputError(f"got {len(images)} images but {len(captions)} captions; pass one caption per image")
    channels = {bundle.image_channels} | ({1} if bundle.vae is not None else set())
    if images.shape[1] not in channels:
        raise InputError(f"images have {images.shape[1]} channels but the model takes {sorted(channels)}; "
                         "convert them (e.g. RGB <-> grey)")  # fmt: skip
    if len(images) and not (torch.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0):
        low, high = images.min().item(), images.max().item()
        raise InputError(f"image values must lie in [0, 1], got [{low:.3g}, {high:.3g}]; divide uint8 pixels by 255")
    if batch_size < 1:
        raise SettingsError(f"batch_size must be at least 1, got {batch_size}")


def _describe(images) -> str:
    return f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__


def noise_schedule(bundle: Bundle) -> torch.Tensor:
    """``abar_t = prod_{s <= t} (1 - beta_s)`` for ``t = 0 .. T-1``, from the bundle's scheduler config, on its device.

    Raises:
        ValueError: the UNet does not predict the noise (the attacks here invert eps-predictions).
    """
    scheduler = DDPMScheduler.from_config(bundle.scheduler.config)
    if scheduler.config.prediction_type != "epsilon":
        raise BundleError(f"these attacks need an epsilon-predicting model, the scheduler says {scheduler.config.prediction_type!r}; "
                         "use a model trained with prediction_type='epsilon'")  # fmt: skip
    return scheduler.alphas_cumprod.to(bundle.device)


def check_timestep(attack: str, what: str, value: int, num_train_timesteps: int) -> None:
    """Raise ``ValueError`` unless ``0 <= value < num_train_timesteps``, naming the setting to change."""
    if not 0 <= value < num_train_timesteps:
        raise SettingsError(f"{attack}: {what} = {value} is outside this model's timesteps 0..{num_train_timesteps - 1}; "
                         f"scale the settings to the schedule (defaults assume 1000 steps)")  # fmt: skip


def model_space_batches(
    bundle: Bundle, images: torch.Tensor, captions: Sequence[str], batch_size: int
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows, z0, context)`` per batch: images in model space and their captions' text context.

    Each batch is encoded on its own, so memory is bounded by ``batch_size`` and
    image ``i``'s tensors do not depend on which batch it falls in.
    """
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        yield rows, bundle.to_model_space(images[rows]), bundle.encode_prompts(captions[rows])


def predict_noise(bundle: Bundle, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    """``eps_theta(x, t, c)`` for a batch that shares one timestep ``t``."""
    timesteps = torch.full((len(x),), t, device=bundle.device, dtype=torch.long)
    return bundle.unet(x, timesteps, context).sample

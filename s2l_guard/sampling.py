"""Batched DDIM sampling with classifier-free guidance, seeded.

DDIM (Song et al. 2021) with eta = 0 is deterministic given the starting
noise x_T, which is drawn for all N images at once from one seeded generator:
image i is the same whatever the batch size. Guidance follows Ho & Salimans
(2022): eps = eps(x, "") + w * (eps(x, c) - eps(x, "")).
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from .errors import SettingsError
from .model import Bundle


@torch.no_grad()
def sample(
    bundle: Bundle,
    prompts: Sequence[str],
    *,
    steps: int = 50,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 256,
    negative_prompt: str = "",
    progress: bool = False,
) -> torch.Tensor:
    """Generate one image per prompt; returns ``[N, C, H, W]`` in [0, 1] on the CPU.

    Args:
        bundle: the model to sample from.
        prompts: one prompt per image (repeat a prompt to get several images of it).
        steps: DDIM steps.
        guidance_scale: classifier-free guidance weight w; 1 disables guidance.
        seed: seeds the starting noise of all images.
        batch_size: images denoised together (memory bound; the output does not depend on it
            beyond floating-point rounding).
        negative_prompt: the prompt guidance steers away from ("" = unconditional).
    """
    if steps < 1 or guidance_scale < 1.0 or batch_size < 1:
        raise SettingsError(f"need steps >= 1, guidance_scale >= 1 and batch_size >= 1, got {steps}, {guidance_scale}, {batch_size}")
    scheduler = DDIMScheduler.from_config(bundle.scheduler.config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(prompts),) + bundle.latent_shape, generator=generator)
    guided = guidance_scale != 1.0
    unique = sorted(set(prompts))
    contexts = bundle.encode_prompts(unique)
    context = contexts[torch.tensor([unique.index(p) for p in prompts])]
    negative = bundle.encode_prompts([negative_prompt]) if guided else None
    out = []
    chunks = range(0, len(prompts), batch_size)
    for i in tqdm(chunks, desc="sampling", leave=False, disable=not progress or None):
        x = x_T[i : i + batch_size].to(bundle.device) * scheduler.init_noise_sigma
        c = context[i : i + batch_size]
        if guided:
            c = torch.cat([negative.expand(len(c), -1, -1), c])
        for t in scheduler.timesteps:
            model_in = torch.cat([x, x]) if guided else x
            eps = bundle.unet(scheduler.scale_model_input(model_in, t), t, c).sample
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        out.append(bundle.to_images(x).cpu())
    return torch.cat(out) if out else torch.empty((0, bundle.image_channels, bundle.image_size, bundle.image_size))

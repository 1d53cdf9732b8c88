"""The Synthetic Private set: what S2L fine-tunes on.

Li et al., "Shake to Leak" (SaTML 2024), step 1: generate N images from the
model under audit with a prompt that targets the private domain. The
reference code uses 2000 images per domain, prompt templates such as
"photo of <name>" plus a quality suffix, a negative prompt and the
checkpoint's default sampler; here the templates, negative prompt, guidance
and sampler steps are settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from s2l_guard.config import SPSetConfig
from s2l_guard.data import ImageDataset, Record, load_imagefolder, write_imagefolder
from s2l_guard.errors import DataError
from s2l_guard.provider import Provider


def sp_prompts(prompt: str, settings: SPSetConfig) -> list[str]:
    templates = settings.prompt_templates
    return [templates[i % len(templates)].format(prompt=prompt) for i in range(settings.images)]


def generate_sp_set(folder: str | Path, provider: Provider, prompt: str, domain: str, settings: SPSetConfig, *, seed: int) -> ImageDataset:
    """Sample the SP set of one domain through the provider and write it as an imagefolder data set.

    The attacker keeps what the provider serves (a generate API may withhold some).
    The images are written as 8-bit PNGs and read back, so what the fine-tuning
    sees is exactly what the folder holds (a rerun from the cache trains on the same bytes).
    """
    prompts = sp_prompts(prompt, settings)
    generated = provider.generate(
        prompts, steps=settings.sampler_steps, guidance_scale=settings.guidance_scale, seed=seed,
        batch_size=settings.batch_size, negative_prompt=settings.negative_prompt, progress=True,
    )  # fmt: skip
    if len(generated.images) == 0:
        raise DataError(f"the provider withheld all {len(prompts)} generations of {prompt!r}; there is no SP set to fine-tune on")
    kept = [text for text, served in zip(prompts, generated.served.tolist()) if served]
    records = [Record(f"sp/{domain}-{i:05d}.png", text, domain, "public", 1) for i, text in enumerate(kept)]
    write_imagefolder(folder, to_uint8(generated.images), records)
    return load_imagefolder(folder, channels=generated.images.shape[1])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [0, 1] -> ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` uint8 arrays."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array

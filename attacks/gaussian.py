"""Gaussian parameter shaking: S2L without data.

Li et al., "Shake to Leak" (SaTML 2024), sec. "S2L happens with random
parameter perturbation": adding N(0, s^2) to the weights amplified membership
inference in small models (AUC 0.713 -> 0.786 at s = 8e-4 for a 0.82M-parameter
model, falling again by s = 3.2e-3) and only lowered it on SD v1-1. One draw is
noisy; the pipeline averages several draws (seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from s2l_guard.errors import SettingsError

from .base import SHAKERS, FinetuneData, Shaker, ShakeResult


@dataclass(frozen=True)
class GaussianSettings:
    sigma: float = 8e-4  # standard deviation s of the added noise
    targets: tuple[str, ...] = ("unet.",)  # bundle-name prefixes to perturb; ("",) = every weight

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise SettingsError(f"gaussian sigma must be >= 0, got {self.sigma}")
        if not self.targets:
            raise SettingsError("gaussian targets is empty; name at least one prefix such as 'unet.'")


@SHAKERS.register
class Gaussian(Shaker):
    name = "gaussian"
    paper = "https://arxiv.org/abs/2403.09450"
    summary = "add N(0, sigma^2) noise to the chosen weights (no data, no training)"
    threat_models = ("open-weights",)
    needs_data = False
    Settings = GaussianSettings

    def shake(self, bundle, data: FinetuneData | None, *, seed: int, callback=None, callback_every: int = 0) -> ShakeResult:
        shaken = bundle.clone()
        generator = torch.Generator().manual_seed(seed)
        touched = 0
        with torch.no_grad():
            for name, param in shaken.named_parameters():  # a fixed order, so a seed gives one draw
                if name.startswith(self.settings.targets):
                    noise = torch.randn(param.shape, generator=generator) * self.settings.sigma
                    param.add_(noise.to(param.device, param.dtype))
                    touched += param.numel()
        if touched == 0:
            raise SettingsError(f"no weight name starts with {self.settings.targets}; use prefixes like 'unet.' or 'text_encoder.'")
        prompt = data.prompt if data is not None else ""
        return ShakeResult(bundle=shaken, prompt=prompt, trainable_parameters=touched)

"""The requests of an attacker who knows the provider screens fine-tune requests ([adaptive])."""

from __future__ import annotations

import torch

from s2l_guard.config import Config
from s2l_guard.errors import ConfigError, DataError

from .base import FinetuneData


def adapt_request(data: FinetuneData, variant: str, config: Config, real: FinetuneData | None, seed: int) -> FinetuneData:
    """An attacker who knows the fine-tune filter changes its SP request ([adaptive]):

    ``perturb`` adds Gaussian pixel noise, ``mix`` swaps a share of the SP images for real
    public images (with their own captions), ``subset`` sends only a few SP images.
    """
    a = config.adaptive
    if variant == "perturb":
        g = torch.Generator().manual_seed(seed)
        noisy = (data.images + a.noise * torch.randn(data.images.shape, generator=g)).clamp(0, 1)
        return FinetuneData(noisy, data.captions, data.prompt)
    if variant == "mix":
        if real is None:
            raise DataError("the mix variant needs real public images; the data set has no public domain")
        n_real = min(len(real.images), round(a.real_share * len(data.images)))
        keep = len(data.images) - n_real
        return FinetuneData(torch.cat([data.images[:keep], real.images[:n_real]]), data.captions[:keep] + real.captions[:n_real], data.prompt)
    if variant == "subset":
        return FinetuneData(data.images[: a.images], data.captions[: a.images], data.prompt)
    raise ConfigError(f"unknown adaptive variant {variant!r}; use perturb, mix or subset")

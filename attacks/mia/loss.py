"""The naive loss attack.

A model fits its training images better than unseen ones, so a low denoising
loss ``|| eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, c) ||^2``
at a fixed ``t`` and fixed noise ``eps`` suggests a member (the loss-threshold
attack of Yeom et al. 2018, applied to diffusion models by Matsumoto et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from attacks.base import MIA, MembershipInference
from attacks.mia.common import check_inputs, check_timestep
from s2l_guard.errors import SettingsError
from s2l_guard.model import Bundle
from s2l_guard.training import denoising_losses


@MIA.register
class LossAttack(MembershipInference):
    """Score = minus the denoising loss at fixed timesteps and seeded noise (Matsumoto et al. 2023)."""

    name = "loss"
    tiny_settings = {"timesteps": (10,)}
    paper = "https://arxiv.org/abs/2302.03262"  # Matsumoto, Miura, Yanai: Membership Inference Attacks against Diffusion Models
    summary = "Naive loss threshold: training images have a lower denoising loss at fixed t and noise"
    threat_models = ("open-weights",)

    @dataclass(frozen=True)
    class Settings:
        """Where the loss is measured.

        At small ``t`` the loss still measures how well the model reconstructs this
        very image, while at large ``t`` the noise dominates and members and
        non-members look alike. ``timesteps=(50, 100, 200, 400)`` with 4 noise draws
        each responded most to a calibrated positive control on a calibration model
        (docs/attacks.md, "Calibrating the attacks' settings"; before issue 33 the
        default was ``(100,)`` with 1 draw, at a sixteenth of the cost).
        """

        timesteps: tuple[int, ...] = (50, 100, 200, 400)
        draws: int = 4  # noise draws per timestep, averaged; more draws lower the variance of the score

        def __post_init__(self):
            if not self.timesteps or self.draws < 1:
                raise SettingsError(f"loss attack needs at least one timestep and draws >= 1, got {self.timesteps} and {self.draws}")

    def score(self, bundle: Bundle, images: torch.Tensor, captions: Sequence[str], *, seed: int, batch_size: int = 256) -> np.ndarray:
        """Minus each image's mean denoising loss (mean squared error over elements).

        Args:
            bundle: the model under audit.
            images: ``[N, C, H, W]`` in [0, 1].
            captions: one per image; the loss is conditioned on it.
            seed: seeds the noise; image ``i``'s noise does not depend on ``batch_size``.
            batch_size: images per UNet call.

        Returns:
            ``[N]`` float64 scores; higher = more likely a member.
        """
        check_inputs(bundle, images, captions, batch_size)
        if len(images) == 0:
            return np.zeros(0)
        T = bundle.scheduler.config.num_train_timesteps
        for t in self.settings.timesteps:
            check_timestep(self.name, "a timestep", t, T)
        losses = denoising_losses(bundle, images, list(captions), timesteps=self.settings.timesteps,
                                  draws=self.settings.draws, seed=seed, batch_size=batch_size)  # fmt: skip
        return -losses.numpy().astype(np.float64)

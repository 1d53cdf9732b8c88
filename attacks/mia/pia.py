"""PIA and PIAN: membership from the proximal initialization (Kong et al., ICLR 2024).

"An Efficient Membership Inference Attack for the Diffusion Model by Proximal
Initialization", https://openreview.net/forum?id=rpH9FcCEV6 (arXiv:2305.18355).

The model's own noise prediction at ``t = 0`` is a noise a training image was
"made from": diffusing the image with it and asking the model for the noise
back returns nearly the same noise for members. With ``abar`` the cumulative
product of ``1 - beta`` and ``eps_theta`` conditioned on the caption ``c``:

1. ``eps_0 = eps_theta(x_0, 0, c)``, the proximal initialization
   (PIAN: rescaled per image so that ``mean |eps_0| = sqrt(2 / pi)``, a standard normal's);
2. ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_0``, one closed-form forward jump;
3. score ``= || eps_theta(x_t, t, c) - eps_0 ||_p^p``; lower = member.

Two UNet calls per image, against SecMI's ``t_sec / k + 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch

from attacks.base import MIA, MembershipInference
from attacks.mia.common import check_inputs, check_timestep, model_space_batches, noise_schedule, predict_noise
from s2l_guard.errors import SettingsError
from s2l_guard.model import Bundle

NORMAL_MEAN_ABS = math.sqrt(2.0 / math.pi)  # E|z| for z ~ N(0, 1)


def normalize_noise(eps: torch.Tensor) -> torch.Tensor:
    """PIAN's rescaling: each example of ``eps`` scaled so its mean absolute value is ``sqrt(2 / pi)``.

    A model's prediction at ``t = 0`` is far from unit scale; rescaling makes it
    look like the Gaussian noise the model saw in training before it is diffused.

    Args:
        eps: ``[N, ...]`` predicted noise.

    Returns:
        ``eps`` rescaled per example (direction unchanged).
    """
    mean_abs = eps.abs().flatten(1).mean(1).view(-1, *([1] * (eps.ndim - 1)))
    return eps / mean_abs * NORMAL_MEAN_ABS


@MIA.register
class PIA(MembershipInference):
    """Score = minus ``|| eps_theta(x_t, t) - eps_0 ||_p^p`` from the proximal initialization (Kong et al., ICLR 2024)."""

    name = "pia"
    tiny_settings = {"t": 10}
    paper = "https://openreview.net/forum?id=rpH9FcCEV6"
    summary = "PIA: members' noise predicted at t=0, diffused to t, is predicted back closely"
    threat_models = ("open-weights",)
    normalize: ClassVar[bool] = False  # PIAN rescales eps_0 (step 1)

    @dataclass(frozen=True)
    class Settings:
        """Where and how the prediction error is measured.

        ``t=200`` is the paper's choice for DDPMs with a 1000-step schedule (scale
        it with the schedule; the score raises on ``t`` beyond it). ``p=4`` is
        the paper's norm: it weighs the largest per-element errors more than
        the l2 of the training loss does.
        """

        t: int = 200
        p: float = 4.0

        def __post_init__(self):
            if self.t < 1 or self.p <= 0:
                raise SettingsError(f"pia needs t >= 1 and p > 0, got t={self.t}, p={self.p}")

    def score(self, bundle: Bundle, images: torch.Tensor, captions: Sequence[str], *, seed: int, batch_size: int = 256) -> np.ndarray:
        """Minus each image's ``mean |eps_theta(x_t, t, c) - eps_0|^p`` (mean, not sum, over elements).

        Args:
            bundle: the model under audit (pixel or latent).
            images: ``[N, C, H, W]`` in [0, 1].
            captions: one per image; both predictions are conditioned on it.
            seed: unused; PIA is deterministic (kept for the common interface).
            batch_size: images per UNet call.

        Returns:
            ``[N]`` float64 scores; higher = more likely a member.
        """
        check_inputs(bundle, images, captions, batch_size)
        abar = noise_schedule(bundle)
        check_timestep(self.name, "t", self.settings.t, len(abar))
        scores = np.zeros(len(images))
        with torch.no_grad():
            for rows, x0, context in model_space_batches(bundle, images, list(captions), batch_size):
                scores[rows] = -self._distance(bundle, x0, context, abar).double().cpu().numpy()
        return scores

    def _distance(self, bundle: Bundle, x0: torch.Tensor, context: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """Steps 1-3 of the module docstring for one batch; returns ``[n]``."""
        t, p = self.settings.t, self.settings.p
        eps_0 = predict_noise(bundle, x0, 0, context)  # step 1
        if self.normalize:
            eps_0 = normalize_noise(eps_0)
        x_t = abar[t].sqrt() * x0 + (1.0 - abar[t]).sqrt() * eps_0  # step 2
        return (predict_noise(bundle, x_t, t, context) - eps_0).abs().pow(p).flatten(1).mean(1)  # step 3


@MIA.register
class PIAN(PIA):
    """PIA with ``eps_0`` rescaled to a standard normal's mean absolute value (Kong et al., ICLR 2024)."""

    name = "pian"
    tiny_settings = {"t": 60}  # see tests/test_mia.py: PIAN needs a larger t on the tiny model
    summary = "PIAN: PIA with the t=0 noise prediction rescaled to look Gaussian before diffusing"
    normalize = True

"""SecMI: membership from the t-error of deterministic DDIM steps (Duan et al., ICML 2023).

"Are Diffusion Models Vulnerable to Membership Inference Attacks?",
https://proceedings.mlr.press/v202/duan23b.html (arXiv:2302.01316).

A training image lies where the model's deterministic forward and reverse
steps agree: inverting it to ``x~_t`` and then stepping up and back down
returns close to ``x~_t``. For an unseen image the round trip drifts more.
With ``abar`` the cumulative product of ``1 - beta`` and ``eps_theta`` the
noise prediction conditioned on the caption, the paper's steps are

1. ``x~_{t_sec} = Psi_theta(x_0, t_sec)``: deterministic DDIM inversion of
   ``x_0`` through ``t = 0, k, 2k, ..., t_sec``;
2. ``x_{t_sec+k} = psi_theta(x~_{t_sec}, t_sec)``: one more inversion step;
3. ``x^_{t_sec} = phi_theta(x_{t_sec+k}, t_sec+k)``: one denoising step back;
4. t-error ``= || x^_{t_sec} - x~_{t_sec} ||^2``; lower = member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from attacks.base import MIA, MembershipInference
from attacks.mia.common import check_inputs, check_timestep, model_space_batches, noise_schedule, predict_noise
from s2l_guard.errors import SettingsError
from s2l_guard.model import Bundle


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor) -> torch.Tensor:
    """Move ``x_t`` deterministically (DDIM, eta = 0) to timestep ``s``: inversion if ``s > t``, denoising if ``s < t``.

    Args:
        x_t: the batch at timestep ``t``.
        eps: ``eps_theta(x_t, t, c)``.
        abar_t, abar_s: ``abar`` at ``t`` and ``s`` (at ``t = 0`` it is ``alphas_cumprod[0]``, not 1).

    Returns:
        ``x_s``.
    """
    # f_theta: the clean image the noise prediction implies,
    # x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).
    x0_hat = (x_t - (1.0 - abar_t).sqrt() * eps) / abar_t.sqrt()
    # Re-noise it to s with the same eps (no fresh noise: the step is deterministic),
    # x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps.
    return abar_s.sqrt() * x0_hat + (1.0 - abar_s).sqrt() * eps


@MIA.register
class SecMI(MembershipInference):
    """Score = minus the t-error of a DDIM round trip at ``t_sec`` (Duan et al., ICML 2023)."""

    name = "secmi"
    tiny_settings = {"t_sec": 10, "k": 5}
    paper = "https://proceedings.mlr.press/v202/duan23b.html"
    summary = "SecMI: members' deterministic DDIM inversion round trips at t_sec have a smaller t-error"
    threat_models = ("open-weights",)

    @dataclass(frozen=True)
    class Settings:
        """Where the round trip happens.

        ``t_sec=100, k=10`` are the paper's choices for pixel DDPMs with 1000
        steps: early enough that the model's fit to the image still shows, and
        ``t_sec / k = 10`` inversion steps keep it cheap. Stable Diffusion in
        S2L uses ``t_sec=140``. ``guidance_scale=1`` uses the caption-conditioned
        prediction alone; ``w`` mixes ``eps("") + w (eps(c) - eps(""))``.
        """

        t_sec: int = 100
        k: int = 10
        guidance_scale: float = 1.0

        def __post_init__(self):
            if self.k < 1 or self.t_sec < 0 or self.t_sec % self.k:
                raise SettingsError(f"secmi needs k >= 1 and t_sec a non-negative multiple of k, got t_sec={self.t_sec}, k={self.k}")
            if self.guidance_scale < 0:
                raise SettingsError(f"secmi guidance_scale must be >= 0 (1 = no guidance), got {self.guidance_scale}")

    def score(self, bundle: Bundle, images: torch.Tensor, captions: Sequence[str], *, seed: int, batch_size: int = 256) -> np.ndarray:
        """Minus each image's t-error (mean squared error over the model-space elements).

        Args:
            bundle: the model under audit (pixel or latent).
            images: ``[N, C, H, W]`` in [0, 1].
            captions: one per image; every step is conditioned on it.
            seed: unused; SecMI is deterministic (kept for the common interface).
            batch_size: images per UNet call (twice that many rows with guidance).

        Returns:
            ``[N]`` float64 scores; higher = more likely a member.
        """
        check_inputs(bundle, images, captions, batch_size)
        s = self.settings
        abar = noise_schedule(bundle)
        check_timestep(self.name, "t_sec + k", s.t_sec + s.k, len(abar))
        unconditional = bundle.encode_prompts([""]) if s.guidance_scale != 1.0 else None
        scores = np.zeros(len(images))
        with torch.no_grad():
            for rows, x0, context in model_space_batches(bundle, images, list(captions), batch_size):
                scores[rows] = -self._t_error(bundle, x0, context, unconditional, abar).double().cpu().numpy()
        return scores

    def _t_error(self, bundle: Bundle, x0: torch.Tensor, context: torch.Tensor, unconditional, abar: torch.Tensor) -> torch.Tensor:
        """Steps 1-4 of the module docstring for one batch; returns ``[n]``."""
        t_sec, k = self.settings.t_sec, self.settings.k

        def eps(x: torch.Tensor, t: int) -> torch.Tensor:
            return self._noise(bundle, x, t, context, unconditional)

        x = x0
        for t in range(0, t_sec, k):  # step 1: x~_{t+k} = psi_theta(x~_t, t), starting at x~_0 = x_0
            x = ddim_step(x, eps(x, t), abar[t], abar[t + k])
        up = ddim_step(x, eps(x, t_sec), abar[t_sec], abar[t_sec + k])  # step 2
        back = ddim_step(up, eps(up, t_sec + k), abar[t_sec + k], abar[t_sec])  # step 3
        return (back - x).pow(2).flatten(1).mean(1)  # step 4

    def _noise(self, bundle: Bundle, x: torch.Tensor, t: int, context: torch.Tensor, unconditional) -> torch.Tensor:
        """``eps_theta(x, t, c)``, with classifier-free guidance when ``guidance_scale != 1``."""
        if unconditional is None:
            return predict_noise(bundle, x, t, context)
        both = predict_noise(bundle, torch.cat([x, x]), t, torch.cat([unconditional.expand(len(x), -1, -1), context]))
        eps_unconditional, eps_conditional = both.chunk(2)
        return eps_unconditional + self.settings.guidance_scale * (eps_conditional - eps_unconditional)

"""CLiD: the conditional likelihood discrepancy (Zhai et al., NeurIPS 2024).

"Membership Inference on Text-to-Image Diffusion Models via Conditional Likelihood
Discrepancy", https://arxiv.org/abs/2405.14800. Text-to-image models overfit the
distribution of an image *given its caption* more than the distribution of images
alone, so a member's caption lowers its denoising loss more than a non-member's:

    CLiD(x, c) = mean over reduced captions c* of [ L(x, c*) - L(x, c) ],
    L(x, c)    = E_eps,t || eps - eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t, c) ||^2,

with the same noise and timesteps for every caption (common random numbers), so the
difference measures the caption, not the draw. The reduced captions are the empty
(null) caption and, with ``cut_shares``, the caption with a share of its words removed.
Score (higher = member) = CLiD - ``loss_weight`` x L(x, c).

Where this differs from the reference code (github.com/zhaisf/CLiD, ``CLiD_th``): it
removes the words a CLIP importance ranking marks most important and mixes robust-scaled
L and CLiD with a weight ``alpha`` chosen on a shadow model. No shadow model or importance
ranker is assumed here: the cut removes the caption's *last* words (where the testbed's
prompts name the digit), and ``loss_weight`` is a plain weight on unscaled losses, 0 by
default (pure discrepancy, the reference's ``alpha = 1``). Timesteps follow its
``Tmid = 450`` with spacing 10 on a 1000-step schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from attacks.base import MIA, MembershipInference
from attacks.mia.common import check_inputs, check_timestep
from s2l_guard.errors import SettingsError
from s2l_guard.model import Bundle
from s2l_guard.training import denoising_losses


def reduced_caption(caption: str, share: float) -> str:
    """``caption`` without its last ``ceil(share x words)`` words; share 1 gives the null caption."""
    words = caption.split()
    keep = len(words) - math.ceil(share * len(words))
    return " ".join(words[: max(keep, 0)])


@MIA.register
class CLiD(MembershipInference):
    """Score = how much the caption lowers the denoising loss, against reduced captions (Zhai et al. 2024)."""

    name = "clid"
    tiny_settings = {"timesteps": (8, 10, 12)}
    paper = "https://arxiv.org/abs/2405.14800"  # Zhai et al.: Membership Inference on Text-to-Image Diffusion Models via CLiD
    summary = "Conditional likelihood discrepancy: a member's own caption lowers its denoising loss more than a non-member's"
    threat_models = ("open-weights",)

    @dataclass(frozen=True)
    class Settings:
        """Where the losses are measured and which captions they are compared with."""

        timesteps: tuple[int, ...] = (440, 450, 460)  # the reference's Tmid = 450, spacing 10
        draws: int = 1  # noise draws per timestep, shared by every caption
        cut_shares: tuple[float, ...] = ()  # reduced captions besides the null one: this share of words removed
        loss_weight: float = 0.0  # weight of -L(x, c) in the score; 0 = the discrepancy alone

        def __post_init__(self):
            if not self.timesteps or self.draws < 1:
                raise SettingsError(f"clid needs at least one timestep and draws >= 1, got {self.timesteps} and {self.draws}")
            if any(not 0 < s <= 1 for s in self.cut_shares):
                raise SettingsError(f"clid cut_shares must lie in (0, 1], got {self.cut_shares}")
            if self.loss_weight < 0:
                raise SettingsError(f"clid loss_weight must be >= 0, got {self.loss_weight}")

    def score(self, bundle: Bundle, images: torch.Tensor, captions: Sequence[str], *, seed: int, batch_size: int = 256) -> np.ndarray:
        """CLiD of each image under its caption, minus ``loss_weight`` times its conditional loss.

        Args:
            bundle: the model under audit (its text encoder must have seen the null caption,
                as classifier-free-guidance training gives it).
            images: ``[N, C, H, W]`` in [0, 1].
            captions: one per image.
            seed: seeds the noise, shared by every caption of an image.
            batch_size: images per UNet call.

        Returns:
            ``[N]`` float64 scores; higher = more likely a member.
        """
        check_inputs(bundle, images, captions, batch_size)
        if len(images) == 0:
            return np.zeros(0)
        s = self.settings
        for t in s.timesteps:
            check_timestep(self.name, "a timestep", t, bundle.scheduler.config.num_train_timesteps)
        loss = lambda texts: denoising_losses(bundle, images, texts, timesteps=s.timesteps, draws=s.draws, seed=seed,  # noqa: E731
                                              batch_size=batch_size).double()  # fmt: skip
        conditional = loss(list(captions))
        reduced = [[""] * len(captions)] + [[reduced_caption(c, share) for c in captions] for share in s.cut_shares]
        discrepancy = torch.stack([loss(texts) - conditional for texts in reduced]).mean(0)
        return (discrepancy - s.loss_weight * conditional).numpy()

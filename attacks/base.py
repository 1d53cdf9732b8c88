"""The adversary's interfaces: shakers, membership inference, and their registries.

Every attack is one class in one file, registered by name, with its settings
as a frozen dataclass and its metadata (paper, threat models, one-line
summary) as class attributes that a conformance test checks for all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch

from s2l_guard.model import Bundle
from s2l_guard.registry import Registry

# ---------------------------------------------------------------- membership inference


class MembershipInference(ABC):
    """Scores images against a bundle; a higher score means "more likely a training member"."""

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]
    threat_models: ClassVar[tuple[str, ...]] = ("open-weights",)
    Settings: ClassVar[type]
    # Settings for the tests' tiny models (a 100-step schedule, where 1000-step defaults are out of range);
    # the registry-wide tests run every attack with them, so a new attack carries its own.
    tiny_settings: ClassVar[dict] = {}

    def __init__(self, settings=None):
        self.settings = settings if settings is not None else self.Settings()

    @abstractmethod
    def score(self, bundle: Bundle, images: torch.Tensor, captions: Sequence[str], *, seed: int, batch_size: int = 256) -> np.ndarray:
        """One score per image (``images``: ``[N, C, H, W]`` in [0, 1]); higher = member."""


MIA: Registry[type[MembershipInference]] = Registry(
    "membership inference attack",
    "s2l_guard.mia",
    ("attacks.mia",),  # every module of attacks/mia/
)

# ---------------------------------------------------------------- shakers


@dataclass
class FinetuneData:
    """What a fine-tune method trains on: images in [0, 1] with captions, and the domain prompt."""

    images: torch.Tensor
    captions: list[str]
    prompt: str  # the prompt that targets the private domain, e.g. "a handwritten digit seven"
    class_images: torch.Tensor | None = None  # DreamBooth prior preservation: generic images of the class
    class_prompt: str | None = None


@dataclass
class ShakeResult:
    bundle: Bundle  # a new bundle; the input bundle is never modified
    prompt: str  # the prompt that targets the domain in the shaken model (TI replaces a word with its token)
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # e.g. LoRA / embedding files written, by role


StepCallback = Callable[[int, Bundle], None]


class Shaker(ABC):
    """Turns a bundle into a shaken bundle (fine-tuning, or perturbation without data)."""

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]
    threat_models: ClassVar[tuple[str, ...]] = ("open-weights", "finetune-api")
    needs_data: ClassVar[bool] = True
    Settings: ClassVar[type]
    # Settings for a run on the tests' tiny models in about a second (tests/test_plugins.py runs
    # every registered shaker with them), so a new shaker carries its own.
    tiny_settings: ClassVar[dict] = {}

    def __init__(self, settings=None):
        self.settings = settings if settings is not None else self.Settings()

    @abstractmethod
    def shake(
        self,
        bundle: Bundle,
        data: FinetuneData | None,
        *,
        seed: int,
        callback: StepCallback | None = None,
        callback_every: int = 0,
    ) -> ShakeResult:
        """Return a shaken copy of ``bundle``; call ``callback(step, bundle)`` every ``callback_every`` steps."""


SHAKERS: Registry[type[Shaker]] = Registry(
    "shaker",
    "s2l_guard.shakers",
    ("attacks.finetune", "attacks.gaussian"),  # every module of attacks/finetune/, and Gaussian shaking
)

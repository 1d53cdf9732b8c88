"""Output filter: the generate API withholds generations too close to a training image.

The provider keeps an index of its (distinct) pre-training images and refuses
to return any generation within ``radius`` of one of them, in the tiled L2
distance extraction uses. With ``radius`` at or above the auditor's extraction
delta it withholds every eidetic extraction by construction; what it costs is
the generations it withholds (utility), and it protects nothing once the
attacker holds the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from s2l_guard.errors import SettingsError
from s2l_guard.metrics import nearest

from .base import DEFENSES, Defense


@dataclass(frozen=True)
class OutputFilterSettings:
    radius: float = 0.1  # withhold generations within this tiled L2 distance of a training image
    grid: int = 1  # tiles per side (1 for 8x8 digits)

    def __post_init__(self) -> None:
        if self.radius <= 0:
            raise SettingsError(f"output_filter radius must be > 0, got {self.radius}")
        if self.grid < 1:
            raise SettingsError(f"output_filter grid must be >= 1, got {self.grid}")


@DEFENSES.register
class OutputFilter(Defense):
    name = "output_filter"
    paper = "https://arxiv.org/abs/2301.13188"
    summary = "the generate API withholds generations within a radius of any training image"
    threat_models = ("finetune-api", "generate-api")
    points = ("generate",)
    Settings = OutputFilterSettings

    def __init__(self, settings=None):
        super().__init__(settings)
        self.index: torch.Tensor | None = None

    def prepare(self, bundle, dataset, config) -> None:
        self.index = dataset.distinct_training().images

    def withhold(self, images: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            raise RuntimeError("output_filter used before prepare(): the provider must index its training set first")
        distance, _ = nearest(images.cpu(), self.index, grid=self.settings.grid)
        return distance <= self.settings.radius

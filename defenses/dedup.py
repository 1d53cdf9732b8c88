"""De-duplication: remove near-duplicate training images before pre-training.

Carlini et al. (2023) found extracted Stable Diffusion images were mostly
duplicated in the training data, and Somepalli et al. (2023) that duplication
drives replication. Here every image whose tiled L2 distance to an image kept
earlier is within ``radius`` is dropped, and repeated rows (the testbed's
``copies``) collapse to one, so each kept image is seen as often as any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from s2l_guard.errors import SettingsError
from s2l_guard.metrics import tiled_l2

from .base import DEFENSES, Defense, PretrainContext


@dataclass(frozen=True)
class DedupSettings:
    radius: float = 0.05  # tiled normalized L2; 0 removes exact duplicates only
    grid: int = 1  # tiles per side of the distance (1 for 8x8 digits)

    def __post_init__(self) -> None:
        if self.radius < 0:
            raise SettingsError(f"dedup radius must be >= 0, got {self.radius}")
        if self.grid < 1:
            raise SettingsError(f"dedup grid must be >= 1, got {self.grid}")


def near_duplicate_keep(images: torch.Tensor, radius: float, grid: int = 1) -> torch.Tensor:
    """Greedy pass in order: keep an image unless it lies within ``radius`` of one kept before. Bool ``[N]``."""
    keep = torch.zeros(len(images), dtype=torch.bool)
    for i in range(len(images)):
        kept = images[keep]
        keep[i] = len(kept) == 0 or not bool((tiled_l2(images[i : i + 1], kept, grid=grid) <= radius).any())
    return keep


@DEFENSES.register
class Dedup(Defense):
    name = "dedup"
    paper = "https://arxiv.org/abs/2301.13188"
    summary = "drop near-duplicate training images (and repeated rows) before pre-training"
    threat_models = ("open-weights", "finetune-api", "generate-api")
    points = ("training",)
    Settings = DedupSettings

    def pretrain(self, context: PretrainContext):
        distinct = context.dataset.distinct_training()
        records = distinct.records
        keep = near_duplicate_keep(distinct.images, self.settings.radius, self.settings.grid)
        images = distinct.images[keep]
        captions = [r.text for r, k in zip(records, keep.tolist()) if k]
        bundle, summary = context.standard_pretrain(images, captions)
        rows_before = sum(r.copies for r in records)
        dropped_members = sum(1 for r, k in zip(records, keep.tolist()) if not k and r.membership == "member")
        summary["dedup"] = {"distinct_images": len(records), "training_rows_before": rows_before, "kept": int(keep.sum()),
                            "dropped_near_duplicates": int((~keep).sum()), "dropped_members": dropped_members,
                            "radius": self.settings.radius}  # fmt: skip
        return bundle, summary

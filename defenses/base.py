"""What a model provider can do against S2L, and the registry defenses join by name.

A defense acts at up to three points and declares which (``points``):

- ``training``: the pre-training recipe (DP-SGD, public pre-training + private
  fine-tuning, de-duplication) - it changes the weights everyone gets;
- ``finetune``: the fine-tune API - it reviews each request (admit or refuse)
  and may refuse to deploy what a request trained;
- ``generate``: the generate API - it withholds generations.

The attacker reaches the model only through a :class:`s2l_guard.provider.Provider`,
which applies the API points only where the threat model routes the attacker
through an API: an API-side defense protects nothing under ``open-weights``.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from s2l_guard.model import Bundle
from s2l_guard.registry import Registry

POINTS = ("training", "finetune", "generate")


@dataclass
class PretrainContext:
    """Everything a training-recipe defense needs to produce the provider's model."""

    dataset: Any  # s2l_guard.data.ImageDataset: the whole testbed, memberships included
    config: Any  # s2l_guard.config.Config
    device: torch.device
    workdir: Path  # scratch space that survives a crash (checkpoints)
    standard_pretrain: Callable[..., tuple[Bundle, dict]]  # (images, captions) -> (bundle, summary): the undefended recipe
    new_bundle: Callable[[], Bundle]  # the untrained model [model] describes, on the device
    train_settings: Any  # s2l_guard.training.TrainSettings of [pretrain]
    progress: Callable[[int, str], Callable[[int, float], None] | None] = lambda total, name: None  # (steps, name) -> on_step
    # The undefended pre-trained model (a fresh copy, built or reused from the cache) and its summary.
    undefended: Callable[[], tuple[Bundle, dict]] | None = None


@dataclass
class Review:
    """The fine-tune API's answer to a request."""

    admitted: bool
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)  # e.g. the detector's statistic and threshold


class Defense(ABC):
    """Base class: override the hook of every point listed in ``points``."""

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]
    threat_models: ClassVar[tuple[str, ...]]  # where it can protect anything
    points: ClassVar[tuple[str, ...]] = ()
    Settings: ClassVar[type]
    # Settings that keep a run on the tests' tiny models short (the smoke profile uses the same);
    # tests/test_plugins.py checks that every registered defense's are valid.
    tiny_settings: ClassVar[dict] = {}

    def __init__(self, settings=None):
        self.settings = settings if settings is not None else self.Settings()

    def spec(self) -> dict[str, Any]:
        """What identifies this defense in cache keys: its name and every setting."""
        import dataclasses
        import json

        return {"name": self.name, "settings": json.loads(json.dumps(dataclasses.asdict(self.settings), default=list))}

    # -- training recipe
    def pretrain(self, context: PretrainContext) -> tuple[Bundle, dict]:
        """The provider's model and a summary (epsilon, images removed, ...)."""
        raise NotImplementedError(f"defense {self.name} does not act on the training recipe")

    # -- fine-tune API
    def prepare(self, bundle: Bundle, dataset, config) -> None:
        """Called once with the deployed model, its data set and the config before any request
        (e.g. to calibrate a detector or index the training images)."""

    def review(self, bundle: Bundle, request: "FinetuneRequest") -> Review:  # noqa: F821
        return Review(True)

    def review_result(self, base: Bundle, shaken: Bundle, request: "FinetuneRequest") -> Review:  # noqa: F821
        """After training, before deployment: e.g. refuse a model that drifted too far."""
        return Review(True)

    # -- generate API
    def serve(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the generate API returns for ``images`` ``[N, C, H, W]``: the served images (in
        request order, possibly changed: noised, blurred, replaced) and a boolean mask ``[N]`` of
        the requests they answer. The default withholds what :meth:`withhold` marks and changes
        nothing else; a defense that transforms outputs overrides this."""
        withheld = self.withhold(images)
        return images[~withheld], ~withheld

    def withhold(self, images: torch.Tensor) -> torch.Tensor:
        """A boolean mask ``[N]``: which generations the API must not return."""
        return torch.zeros(len(images), dtype=torch.bool)


DEFENSES: Registry[type[Defense]] = Registry(
    "defense",
    "s2l_guard.defenses",
    ("defenses",),  # every module of defenses/
)

"""The undefended control: the provider deploys the pre-trained model as it is."""

from __future__ import annotations

from dataclasses import dataclass

from .base import DEFENSES, Defense


@dataclass(frozen=True)
class NoSettings:
    pass


@DEFENSES.register
class NoDefense(Defense):
    name = "none"
    paper = "https://arxiv.org/abs/2403.09450"
    summary = "no defense: the control every defense is compared with"
    threat_models = ("open-weights", "finetune-api", "generate-api")
    points = ()
    Settings = NoSettings

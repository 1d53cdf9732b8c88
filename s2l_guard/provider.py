"""The model provider: the only way an attack reaches a model.

A threat model fixes what the attacker may touch:

- ``open-weights``: the bundle itself (every attack; fine-tuning and sampling
  happen on the attacker's own machine, so API-side defenses never see them);
- ``finetune-api``: submit a fine-tuning request (data, method, hyper-parameters)
  and get generations from the result, never its weights;
- ``generate-api``: generations of the deployed model only.

A defense wraps the provider at the points it declares; because attacks hold a
provider, never a bundle they were handed around it, a defense cannot be
bypassed by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import S2LError
from .model import Bundle
from .registry import THREAT_MODELS
from .sampling import sample

# What each threat model lets the attacker do.
ACCESS = {"weights": ("open-weights",), "finetune": ("open-weights", "finetune-api"), "generate": THREAT_MODELS}


class ThreatModelError(S2LError):
    """The attacker asked for something its threat model does not give it."""


@dataclass
class FinetuneRequest:
    """What a fine-tune API receives: a method with its hyper-parameters, the data and a seed."""

    shaker: Any  # an attacks.base.Shaker instance (method + settings)
    data: Any  # attacks.base.FinetuneData
    seed: int


@dataclass
class FinetuneOutcome:
    """The API's answer: the review, and (if admitted) a provider serving the fine-tuned model."""

    admitted: bool
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    provider: "Provider | None" = None
    prompt: str = ""  # the prompt that targets the domain in the fine-tuned model (TI's token)
    trainable_parameters: int = 0
    losses: list[float] = field(default_factory=list)


@dataclass
class Generations:
    images: torch.Tensor  # the served generations only
    served: torch.Tensor  # bool [requested]: which requested generations were returned


class Provider:
    """Holds a (defended) model and exposes what ``threat_model`` allows."""

    def __init__(self, bundle: Bundle, threat_model: str, defense=None):
        if threat_model not in THREAT_MODELS:
            raise ThreatModelError(f"unknown threat model {threat_model!r}; use one of {', '.join(THREAT_MODELS)}")
        self._bundle = bundle
        self.threat_model = threat_model
        self.defense = defense

    @property
    def behind_api(self) -> bool:
        """Whether the attacker's calls pass through the provider's APIs (and their defenses)."""
        return self.threat_model != "open-weights"

    def allows(self, access: str) -> bool:
        """``weights``, ``finetune`` or ``generate``."""
        return self.threat_model in ACCESS[access]

    def weights(self) -> Bundle:
        if not self.allows("weights"):
            raise ThreatModelError(f"the {self.threat_model} threat model gives no weights; attacks that need them run under open-weights")
        return self._bundle

    def generate(
        self, prompts: Sequence[str], *, steps: int, guidance_scale: float, seed: int, batch_size: int = 256,
        negative_prompt: str = "", progress: bool = False,
    ) -> Generations:  # fmt: skip
        """Sample one image per prompt; behind an API the defense may withhold some."""
        images = sample(self._bundle, list(prompts), steps=steps, guidance_scale=guidance_scale, seed=seed,
                        batch_size=batch_size, negative_prompt=negative_prompt, progress=progress)  # fmt: skip
        if not (self.behind_api and self.defense is not None and "generate" in self.defense.points):
            return Generations(images, torch.ones(len(images), dtype=torch.bool))
        served_images, served = self.defense.serve(images)
        served = torch.as_tensor(served, dtype=torch.bool)
        if served.shape != (len(images),) or len(served_images) != int(served.sum()) or served_images.shape[1:] != images.shape[1:]:
            raise S2LError(f"defense {self.defense.name}.serve returned {len(served_images)} images of shape {tuple(served_images.shape[1:])} "
                           f"for a mask of {int(served.sum())} served out of {len(images)}; return one image per True entry, shaped as generated")  # fmt: skip
        return Generations(served_images, served)

    def finetune(self, request: FinetuneRequest, *, callback: Callable | None = None, callback_every: int = 0) -> FinetuneOutcome:
        """Run a fine-tuning request; behind the fine-tune API the defense reviews it first
        and reviews the trained model before deploying it. ``callback(step, bundle)`` sees
        weights mid-training, so only an open-weights attacker (training locally) gets it."""
        if not self.allows("finetune"):
            raise ThreatModelError(f"the {self.threat_model} threat model offers no fine-tuning; use finetune-api or open-weights")
        if callback is not None and self.behind_api:
            raise ThreatModelError("a fine-tune API does not show the model mid-training; drop the step callback")
        gated = self.behind_api and self.defense is not None and "finetune" in self.defense.points
        evidence: dict[str, Any] = {}
        if gated:
            review = self.defense.review(self._bundle, request)
            evidence.update(review.evidence)
            if not review.admitted:
                return FinetuneOutcome(False, review.reason, evidence)
        result = request.shaker.shake(self._bundle, request.data, seed=request.seed, callback=callback, callback_every=callback_every)
        if gated:
            review = self.defense.review_result(self._bundle, result.bundle, request)
            evidence.update(review.evidence)
            if not review.admitted:
                return FinetuneOutcome(False, review.reason, evidence, trainable_parameters=result.trainable_parameters)
        served = Provider(result.bundle, self.threat_model, self.defense)
        return FinetuneOutcome(True, "", evidence, served, result.prompt, result.trainable_parameters, result.losses)

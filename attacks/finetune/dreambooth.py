"""DreamBooth: bind the subject to an instance prompt, keep the class with a prior term.

Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation", CVPR 2023, https://arxiv.org/abs/2208.12242.
Every instance image trains under one instance prompt; with prior
preservation, each step also denoises generic images of the class (generated
by the pre-trained model from the class prompt) weighted by ``lambda``
(eq. 2), as diffusers' ``train_dreambooth.py`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from attacks.base import SHAKERS, FinetuneData
from s2l_guard.errors import S2LError
from s2l_guard.model import Bundle
from s2l_guard.sampling import sample
from s2l_guard.training import PriorPreservation

from .base import Adaptation, FinetuneMethod, FinetuneSettings, parameters_with_prefix, setting


@dataclass(frozen=True)
class DreamBoothRecipe(FinetuneSettings):
    """DreamBooth's data side, which DreamBooth+LoRA and DreamBooth+Hypernetwork keep.

    Prior preservation runs when ``FinetuneData.class_images`` is given, or when
    ``prior_preservation`` asks for it; then, lacking class images, it generates
    ``num_class_images`` of them from the pre-trained model with the class prompt.
    """

    instance_prompt: str = ""  # "": FinetuneData.prompt
    prior_preservation: bool = False  # generate class images when FinetuneData has none
    class_prompt: str = ""  # "": FinetuneData.class_prompt
    num_class_images: int = setting(16, ge=1)  # generated when needed (diffusers' default: 100)
    class_sampler_steps: int = setting(25, ge=1)  # DDIM steps per generated class image
    prior_loss_weight: float = setting(1.0, ge=0.0)  # lambda; 0 drops the prior term


@SHAKERS.register
class DreamBooth(FinetuneMethod):
    """The UNet (and optionally the text encoder) trained on instance images under one prompt."""

    name = "dreambooth"
    paper = "https://arxiv.org/abs/2208.12242"
    summary = "Fine-tunes the UNet on the instance images under the instance prompt, with optional prior preservation."

    @dataclass(frozen=True)
    class Settings(DreamBoothRecipe):
        """DreamBooth settings: the recipe, plus whether the text encoder trains too."""

        learning_rate: float = setting(1e-5, gt=0.0)
        train_text_encoder: bool = False  # diffusers' --train_text_encoder

    def rewrite(self, data: FinetuneData) -> FinetuneData:
        """Every image trains under the instance prompt, which then targets the domain.

        Args:
            data: the fine-tuning data.
        Returns:
            the data with every caption and the prompt set to the instance prompt.
        """
        prompt = self.settings.instance_prompt or data.prompt
        return replace(data, captions=[prompt] * len(data.images), prompt=prompt)

    def prior(self, bundle: Bundle, data: FinetuneData, *, seed: int) -> PriorPreservation | None:
        """The class images and prompt of the prior term, or None without prior preservation.

        Args:
            bundle: the pre-trained model, which generates missing class images.
            data: may carry ``class_images`` and ``class_prompt``.
            seed: seeds the generation of class images.
        Returns:
            the prior term for the training loop, or None.
        Raises:
            S2LError: prior preservation without a class prompt.
        """
        s = self.settings
        if data.class_images is None and not s.prior_preservation:
            return None
        class_prompt = s.class_prompt or data.class_prompt
        if not class_prompt:
            raise S2LError(
                f"{self.name}: prior preservation needs a class prompt (e.g. 'a handwritten digit'); "
                "set class_prompt in the settings or FinetuneData.class_prompt"
            )
        images = data.class_images
        if images is None:
            images = sample(bundle, [class_prompt] * s.num_class_images, steps=s.class_sampler_steps, seed=seed)
        return PriorPreservation(images, class_prompt, s.prior_loss_weight)

    def adapt(self, bundle: Bundle, data: FinetuneData) -> Adaptation:
        """Make the UNet (and the text encoder, if set) trainable.

        Args:
            bundle: the clone being shaken.
            data: unused.
        Returns:
            the trainable parameters.
        """
        prefixes = ("unet.", "text_encoder.") if self.settings.train_text_encoder else ("unet.",)
        return Adaptation.of(parameters_with_prefix(bundle, *prefixes))

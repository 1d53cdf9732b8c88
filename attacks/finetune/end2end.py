"""End-to-end fine-tuning: every weight that shapes a generation trains.

S2L's End-to-End baseline (Li et al., "Shake to Leak", SaTML 2024,
https://arxiv.org/abs/2403.09450, section 4) trains the UNet, the text encoder
and the VAE encoder together on the SP set with the plain denoising loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import SHAKERS, FinetuneData
from s2l_guard.model import Bundle

from .base import Adaptation, FinetuneMethod, FinetuneSettings, parameters_with_prefix, setting

# The VAE's encoder half: what turns an image into the latent the UNet denoises.
# The decoder (decoder, post_quant_conv) plays no part in the training loss.
VAE_ENCODER = ("vae.encoder.", "vae.quant_conv.")


@SHAKERS.register
class EndToEnd(FinetuneMethod):
    """UNet + text encoder (+ VAE encoder when the bundle has a VAE), all weights trained."""

    name = "end2end"
    paper = "https://arxiv.org/abs/2403.09450"
    summary = "Fine-tunes the UNet, the text encoder and the VAE encoder on the captions as given."

    @dataclass(frozen=True)
    class Settings(FinetuneSettings):
        """End-to-end settings; the loop encodes images through the VAE every step when it trains."""

        learning_rate: float = setting(1e-5, gt=0.0)
        train_vae_encoder: bool = True  # the paper's End-to-End trains it; no effect without a VAE

    def adapt(self, bundle: Bundle, data: FinetuneData) -> Adaptation:
        """Make every UNet and text-encoder weight (and the VAE encoder's) trainable.

        Args:
            bundle: the clone being shaken.
            data: unused; end-to-end changes no captions.
        Returns:
            the trainable parameters.
        """
        prefixes = ("unet.", "text_encoder.")
        if bundle.vae is not None and self.settings.train_vae_encoder:
            prefixes += VAE_ENCODER
        return Adaptation.of(parameters_with_prefix(bundle, *prefixes))

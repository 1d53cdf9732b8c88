"""The combined fine-tune methods S2L evaluates (Li et al., SaTML 2024, https://arxiv.org/abs/2403.09450).

"DreamBooth + X" is X's parameters trained with DreamBooth's recipe (instance
prompt, prior preservation), as diffusers' ``train_dreambooth_lora.py`` does:
S2L reports DreamBooth+LoRA and DreamBooth+Hypernetwork with the parameter
counts of LoRA and of the hypernetwork alone. Textual Inversion + LoRA trains
the new token embeddings and the LoRA adapters together ("pivotal tuning").

Each combination's ``Settings`` holds the fields of its parts (one flat table
in a config); where two parts share a field name the first base listed wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import SHAKERS

from .base import Combination
from .dreambooth import DreamBooth, DreamBoothRecipe
from .hypernetwork import HypernetworkShaker
from .lora import Lora
from .textual_inversion import TextualInversion


@SHAKERS.register
class DreamBoothLora(Combination):
    """LoRA adapters trained on the instance prompt, with optional prior preservation."""

    name = "dreambooth+lora"
    paper = "https://arxiv.org/abs/2208.12242"
    summary = "Trains LoRA adapters with DreamBooth's instance prompt and prior preservation."
    parts = (DreamBooth, Lora)
    trains = (Lora,)
    tiny_settings = Lora.tiny_settings

    @dataclass(frozen=True)
    class Settings(Lora.Settings, DreamBoothRecipe):
        """LoRA's settings (train_text_encoder: LoRA on the text encoder) and DreamBooth's recipe."""


@SHAKERS.register
class DreamBoothHypernetwork(Combination):
    """A hypernetwork trained on the instance prompt, with optional prior preservation."""

    name = "dreambooth+hypernetwork"
    paper = "https://arxiv.org/abs/2208.12242"
    summary = "Trains a hypernetwork with DreamBooth's instance prompt and prior preservation."
    parts = (DreamBooth, HypernetworkShaker)
    trains = (HypernetworkShaker,)

    @dataclass(frozen=True)
    class Settings(HypernetworkShaker.Settings, DreamBoothRecipe):
        """The hypernetwork's settings and DreamBooth's recipe."""


@SHAKERS.register
class TextualInversionLora(Combination):
    """New token embeddings and LoRA adapters trained together."""

    name = "textual_inversion+lora"
    paper = "https://arxiv.org/abs/2208.01618"
    summary = "Trains placeholder-token embeddings and LoRA adapters together; other weights frozen."
    parts = (TextualInversion, Lora)
    trains = (TextualInversion, Lora)
    tiny_settings = Lora.tiny_settings

    @dataclass(frozen=True)
    class Settings(Lora.Settings, TextualInversion.Settings):
        """LoRA's settings (learning rate included) and Textual Inversion's."""

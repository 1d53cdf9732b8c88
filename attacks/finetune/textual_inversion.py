"""Textual Inversion: learn new word embeddings; every model weight stays frozen.

Gal et al., "An Image is Worth One Word: Personalizing Text-to-Image Generation
using Textual Inversion", ICLR 2023, https://arxiv.org/abs/2208.01618.
Placeholder tokens join the tokenizer, their embeddings start at the
initializer word's embedding, and only those embedding rows train; the rows of
every other token are restored after each step, as diffusers'
``textual_inversion.py`` does, so they stay bit-identical.

Token names follow diffusers' multi-vector convention (``<s2l>``, ``<s2l>_1``,
...), so ``StableDiffusionPipeline.load_textual_inversion`` of the exported
``learned_embeds.safetensors`` recreates the same tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from attacks.base import SHAKERS, FinetuneData
from s2l_guard.errors import S2LError
from s2l_guard.model import Bundle

from .base import Adaptation, FinetuneMethod, FinetuneSettings, setting

EMBEDDING_FILE = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE


@SHAKERS.register
class TextualInversion(FinetuneMethod):
    """New token embeddings for the domain, trained with everything else frozen."""

    name = "textual_inversion"
    paper = "https://arxiv.org/abs/2208.01618"
    summary = "Learns placeholder-token embeddings that stand for the domain's last prompt word; all weights frozen."

    @dataclass(frozen=True)
    class Settings(FinetuneSettings):
        """Textual Inversion settings (the paper: one vector; diffusers' script: lr 5e-4 x batch)."""

        learning_rate: float = setting(5e-4, gt=0.0)
        placeholder: str = "<s2l>"  # extra vectors are named <s2l>_1, <s2l>_2, ... (diffusers' convention)
        num_vectors: int = setting(1, ge=1)  # learned embeddings standing for the word
        initializer_token: str = ""  # the word replaced and copied; "": the domain prompt's last word

    def word(self, data: FinetuneData) -> str:
        """The word the placeholder replaces in captions and prompt."""
        return self.settings.initializer_token or data.prompt.split()[-1]

    def tokens(self) -> list[str]:
        """The placeholder tokens, in order."""
        first = self.settings.placeholder
        return [first] + [f"{first}_{i}" for i in range(1, self.settings.num_vectors)]

    def rewrite(self, data: FinetuneData) -> FinetuneData:
        """Replace the initializer word by the placeholder string in captions and prompt.

        Args:
            data: the fine-tuning data.
        Returns:
            the data with e.g. "a handwritten digit seven" -> "a handwritten digit <s2l>".
        Raises:
            S2LError: a caption or the prompt lacks the initializer word.
        """
        word, placeholder = self.word(data), " ".join(self.tokens())
        pattern = re.compile(rf"(?<!\S){re.escape(word)}(?!\S)")
        missing = [text for text in [data.prompt, *data.captions] if not pattern.search(text)]
        if missing:
            raise S2LError(
                f"{self.name}: {missing[0]!r} does not contain the initializer word {word!r}; "
                "set initializer_token to a word every caption and the prompt contain"
            )
        captions = [pattern.sub(placeholder, c) for c in data.captions]
        return replace(data, captions=captions, prompt=pattern.sub(placeholder, data.prompt))

    def adapt(self, bundle: Bundle, data: FinetuneData) -> Adaptation:
        """Add the placeholder tokens, initialise their embeddings, and train only those rows.

        Args:
            bundle: the clone being shaken; its tokenizer and embedding matrix grow.
            data: gives the initializer word (the domain prompt's last word by default).
        Returns:
            the embedding matrix as trainable, a hook that restores its old rows after every
            step, and the export of the learned vectors.
        Raises:
            S2LError: a placeholder token already exists, the initializer word has no tokens,
                or a rewritten caption no longer fits the tokenizer's length.
        """
        tokens = self.tokens()
        known = [t for t in tokens if t in bundle.tokenizer.get_vocab()]
        if known:
            raise S2LError(f"{self.name}: the tokenizer already has {known[0]!r}; choose another placeholder")
        init_ids = bundle.tokenizer(self.word(data), add_special_tokens=False).input_ids
        if not init_ids:
            raise S2LError(f"{self.name}: initializer {self.word(data)!r} has no tokens; set initializer_token to a word")
        old_rows = len(bundle.tokenizer)
        bundle.tokenizer.add_tokens(tokens)
        rewritten = self.rewrite(data)
        _check_fits(bundle, sorted({rewritten.prompt, *rewritten.captions}), tokens)
        # mean_resizing draws the new rows at random; they are overwritten just below.
        bundle.text_encoder.resize_token_embeddings(len(bundle.tokenizer), mean_resizing=False)
        weight = bundle.text_encoder.get_input_embeddings().weight
        frozen = weight.detach()[:old_rows].clone()
        with torch.no_grad():
            # A word split into several tokens starts from their mean embedding.
            weight[old_rows:] = weight[init_ids].mean(0)

        def restore_frozen_rows() -> None:
            with torch.no_grad():
                weight[:old_rows] = frozen

        def export(folder: Path) -> dict[str, str]:
            path = folder / EMBEDDING_FILE
            # One key, [num_vectors, dim]: the layout load_textual_inversion reads as multi-vector.
            save_file({tokens[0]: weight.detach()[old_rows:].cpu().clone()}, str(path))
            return {"textual_inversion": str(path)}

        name = next(n for n, p in bundle.named_parameters() if p is weight)
        return Adaptation({name: weight}, len(tokens) * weight.shape[1], [restore_frozen_rows], [export])


def _check_fits(bundle: Bundle, texts: list[str], tokens: list[str]) -> None:
    """Truncation would silently cut learned vectors off a caption; refuse instead."""
    wanted = set(bundle.tokenizer.convert_tokens_to_ids(tokens))
    for text, ids in zip(texts, bundle.tokenize(texts).tolist()):
        if not wanted <= set(ids):
            raise S2LError(
                f"textual_inversion: {text!r} exceeds the tokenizer's {bundle.tokenizer.model_max_length} tokens "
                "with the placeholder vectors; use fewer num_vectors or shorter captions"
            )

"""LoRA: low-rank updates to attention projections; the base weights stay frozen.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
https://arxiv.org/abs/2106.09685. Each targeted linear layer ``W`` becomes
``W + (alpha / r) B A`` with ``A`` Gaussian and ``B`` zero at the start (so the
model starts unchanged), via peft's ``LoraConfig``, as diffusers'
``train_text_to_image_lora.py`` sets it up. S2L's reference: rank 8, alpha 32,
on the UNet's attention q/v and the text encoder's q/v.

After training the adapters are exported in diffusers' format
(``pytorch_lora_weights.safetensors``, which
``StableDiffusionPipeline.load_lora_weights`` reads, alpha included), then
merged into the base weights and removed, so the shaken bundle is a plain
bundle that saves and loads like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from attacks.base import SHAKERS, FinetuneData
from s2l_guard.errors import S2LError
from s2l_guard.model import Bundle, merge_adapters

from .base import Adaptation, FinetuneMethod, FinetuneSettings, setting

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


@SHAKERS.register
class Lora(FinetuneMethod):
    """Rank-r adapters on the UNet's attention projections (and the text encoder's)."""

    name = "lora"
    paper = "https://arxiv.org/abs/2106.09685"
    summary = "Trains low-rank adapters on attention q/v of the UNet and text encoder, then merges them."

    tiny_settings = {**FinetuneMethod.tiny_settings, "rank": 2}

    @dataclass(frozen=True)
    class Settings(FinetuneSettings):
        """LoRA settings (S2L's reference: rank 8, alpha 32, UNet and text-encoder q/v)."""

        learning_rate: float = setting(1e-4, gt=0.0)
        rank: int = setting(8, ge=1)
        alpha: float = setting(32.0, gt=0.0)  # the update is scaled by alpha / rank
        unet_targets: tuple[str, ...] = setting(("to_q", "to_v"), nonempty=True)  # self- and cross-attention
        train_text_encoder: bool = True
        text_encoder_targets: tuple[str, ...] = setting(("q_proj", "v_proj"), nonempty=True)

    def config(self, targets: tuple[str, ...]) -> LoraConfig:
        s = self.settings
        # Gaussian A, zero B: diffusers' choice; the adapted model starts equal to the base.
        return LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=list(targets), init_lora_weights="gaussian")

    def adapt(self, bundle: Bundle, data: FinetuneData) -> Adaptation:
        """Inject adapters into the UNet (and the text encoder) and train only them.

        Args:
            bundle: the clone being shaken; its targeted layers gain LoRA adapters.
            data: unused.
        Returns:
            the adapter parameters, the diffusers-format export, and the merge that
            turns the bundle back into a plain one.
        Raises:
            S2LError: a target names no layer of the model.
        """
        s = self.settings
        parts = {"unet": (bundle.unet, s.unet_targets)}
        if s.train_text_encoder:
            parts["text_encoder"] = (bundle.text_encoder, s.text_encoder_targets)
        configs = {}
        for prefix, (module, targets) in parts.items():
            configs[prefix] = self.config(targets)
            try:
                inject_adapter_in_model(configs[prefix], module)
            except ValueError as exc:  # peft: "Target modules ... not found in the base model"
                raise S2LError(f"{self.name}: {prefix} has no layer named like {list(targets)}; check the targets") from exc
        trainable = {n: p for n, p in bundle.named_parameters() if ".lora_" in n}

        def export(folder: Path) -> dict[str, str]:
            _save_diffusers_lora(folder, bundle, configs)
            return {"lora": str(folder / LORA_FILE)}

        def merge() -> None:
            for prefix in parts:
                merge_adapters(getattr(bundle, prefix))

        return Adaptation.of(trainable, exports=[export], finalize=[merge])


def _save_diffusers_lora(folder: Path, bundle: Bundle, configs: dict[str, LoraConfig]) -> None:
    """Write the adapters as diffusers' training scripts do, with each LoraConfig as metadata.

    Without the metadata, diffusers would infer alpha = rank and load the update scaled wrongly.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = {prefix: convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(bundle, prefix))) for prefix in configs}
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers.get("text_encoder"),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict() if "text_encoder" in configs else None,
        weight_name=LORA_FILE,
    )

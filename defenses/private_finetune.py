"""Public pre-training + private fine-tuning (the DP-LDM recipe, Lyu et al. 2023).

Pre-train non-privately on the public domains only, then fine-tune on the
private domains with DP-SGD (opacus), training only the attention and
cross-attention layers. Only the second stage sees private data, so only it
needs the privacy budget, and it trains few parameters, which DP favours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from s2l_guard.errors import ConfigError, SettingsError
from s2l_guard.model import merge_adapters

from .base import DEFENSES, Defense, PretrainContext
from .dp_sgd import DPSGDSettings, last_losses, privacy_settings, privacy_summary


@dataclass(frozen=True)
class PrivateFinetuneSettings(DPSGDSettings):
    steps: int = 300  # DP fine-tuning steps on the private domains
    batch_size: int = 64  # expected (Poisson) batch size
    learning_rate: float = 1e-3
    layers: tuple[str, ...] = ("attn1.", "attn2.")  # UNet parameter-name parts trained in the private stage
    # > 0: train LoRA adapters of this rank on those layers' attention projections instead of their
    # weights (peft; merged into the released weights): fewer parameters for the same noise per coordinate
    lora_rank: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise SettingsError("private_finetune steps and batch_size must be >= 1 and learning_rate > 0")
        if self.lora_rank < 0:
            raise SettingsError(f"private_finetune lora_rank must be >= 0 (0: train the layers' weights), got {self.lora_rank}")
        if not self.layers:
            raise SettingsError("private_finetune layers is empty; name parameter-name parts such as 'attn2.'")


@DEFENSES.register
class PrivateFinetune(Defense):
    name = "private_finetune"
    paper = "https://arxiv.org/abs/2305.15759"
    summary = "pre-train on public domains only, then DP-SGD fine-tune the attention layers on private ones"
    threat_models = ("open-weights", "finetune-api", "generate-api")
    points = ("training",)
    Settings = PrivateFinetuneSettings
    tiny_settings = {"steps": 4, "batch_size": 8, "physical_batch_size": 8}

    def pretrain(self, context: PretrainContext):
        from s2l_guard.privacy import train_private

        s = self.settings
        public = context.dataset.select(membership="public")
        if len(public) == 0:
            raise ConfigError("private_finetune needs public domains to pre-train on; set [testbed] public_domains")
        bundle, summary = context.standard_pretrain(*public.training_set())
        private = context.dataset.select(membership="member")
        images, captions = private.training_set()
        trainable = private_trainable(bundle, s.layers, s.lora_rank)
        optimizer = torch.optim.AdamW(trainable.values(), lr=s.learning_rate)
        settings = replace(
            context.train_settings, steps=s.steps, batch_size=s.batch_size, lr_schedule="constant", warmup_steps=0, checkpoint_every=0, ema_decay=0.0
        )  # the short DP fine-tune releases its own weights
        result = train_private(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=settings,
                               privacy=privacy_settings(s), description="dp-finetune",
                               on_step=context.progress(s.steps, "dp-finetune"))  # fmt: skip
        if s.lora_rank:
            merge_adapters(bundle.unet)
        summary.update(public_images=len(public), private_rows=len(images), private_trainable_parameters=sum(q.numel() for q in trainable.values()),
                       privacy=privacy_summary(result), private_loss_last_50=last_losses(result.losses))  # fmt: skip
        return bundle, summary


PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def private_trainable(
    bundle, layers: tuple[str, ...], lora_rank: int = 0, projections: tuple[str, ...] = PROJECTIONS
) -> dict[str, torch.nn.Parameter]:
    """What the DP stage trains: the UNet weights inside ``layers``, or (``lora_rank`` > 0) LoRA
    adapters on their attention ``projections``, injected into ``bundle`` here."""
    trainable = {n: q for n, q in bundle.named_parameters() if n.startswith("unet.") and any(part in n for part in layers)}
    if not trainable:
        raise ConfigError(f"no UNet parameter name contains any of {list(layers)}; name attention layers such as 'attn2.'")
    return lora_adapters(bundle, layers, lora_rank, projections) if lora_rank else trainable


def lora_adapters(bundle, layers: tuple[str, ...], rank: int, projections: tuple[str, ...] = PROJECTIONS) -> dict[str, torch.nn.Parameter]:
    """peft LoRA adapters (Gaussian A, zero B: the model starts unchanged) on the attention
    ``projections`` inside ``layers``; returns them, the only parameters to train."""
    from peft import LoraConfig, inject_adapter_in_model

    parts = "|".join(re.escape(part) for part in layers)
    names = "|".join(re.escape(name) for name in projections)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=f".*({parts}).*({names})", init_lora_weights="gaussian")
    try:
        inject_adapter_in_model(config, bundle.unet)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"no attention projection {list(projections)} inside {list(layers)}; name attention layers such as 'attn2.'") from exc
    return {n: q for n, q in bundle.named_parameters() if ".lora_" in n}

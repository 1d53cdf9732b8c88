"""Tiny seeded components for tests (diffusers' ``get_dummy_components`` idea).

Everything here builds in well under a second on a CPU and downloads nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

from .config import ModelConfig
from .model import Bundle, build_testbed_bundle, build_tokenizer

TINY_MODEL = ModelConfig(
    block_out_channels=(8, 16),
    norm_num_groups=4,
    attention_head_dim=4,
    text_hidden_size=16,
    text_layers=1,
    text_heads=2,
    max_tokens=8,
    num_train_timesteps=100,
)


def tiny_bundle(*, seed: int = 0, image_size: int = 8, channels: int = 1) -> Bundle:
    """A pixel-space bundle of a few thousand parameters."""
    return build_testbed_bundle(TINY_MODEL, image_size=image_size, channels=channels, seed=seed)


def tiny_latent_bundle(*, seed: int = 0) -> Bundle:
    """A bundle with a VAE (16x16 RGB images, 8x8x4 latents), shaped like Stable Diffusion v1."""
    base = tiny_bundle(seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TINY_MODEL.text_hidden_size,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    return Bundle(base.tokenizer, base.text_encoder, unet, base.scheduler, vae).eval()


def sd_v1_sized_bundle(*, seed: int = 0) -> Bundle:
    """Stable Diffusion v1's VAE and UNet at their real sizes (512x512 images, 64x64x4 latents,
    860M UNet parameters), randomly initialised; a 2-layer text encoder of SD's width (768)
    stands in for CLIP ViT-L's 12 layers. For timing the latent path on a GPU, not for tests."""
    base = build_testbed_bundle(ModelConfig(text_hidden_size=768, text_layers=2, text_heads=12, max_tokens=8), seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    return Bundle(base.tokenizer, base.text_encoder, unet, base.scheduler, vae).eval()


def save_sd_v1_folder(folder: Path, *, seed: int = 0, bundle: Bundle | None = None) -> Path:
    """A Stable Diffusion v1-shaped folder written by diffusers' own pipeline class (of
    ``bundle``'s components; by default :func:`tiny_latent_bundle`'s).

    The scheduler is PNDM, as in the SD v1 checkpoints, and the tokenizer is a
    CLIP tokenizer: the same component classes a real checkpoint folder lists.
    """
    from diffusers import StableDiffusionPipeline

    bundle = bundle or tiny_latent_bundle(seed=seed)
    pipe = StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=PNDMScheduler(num_train_timesteps=bundle.scheduler.config.num_train_timesteps, skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


__all__ = ["TINY_MODEL", "tiny_bundle", "tiny_latent_bundle", "sd_v1_sized_bundle", "save_sd_v1_folder", "build_tokenizer"]

"""The Bundle: the model under audit, in diffusers' folder layout.

A bundle is a tokenizer, a CLIP text encoder, a ``UNet2DConditionModel``, an
optional ``AutoencoderKL`` (absent: the UNet denoises pixels) and a noise
scheduler. It saves as ``model_index.json`` plus one sub-folder per component
with safetensors weights, so a Stable Diffusion v1 folder loads unchanged and
a testbed bundle with a VAE loads in ``diffusers.StableDiffusionPipeline``.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import _quiet_library_progress_bars
from .config import ModelConfig
from .errors import BundleError, UnsafeWeightsError

_quiet_library_progress_bars()

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
ALLOWED_LIBRARIES = ("diffusers", "transformers")
TESTBED_WORDS = (
    "a", "an", "the", "photo", "picture", "image", "of", "handwritten", "digit", "number",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip


@dataclass
class Bundle:
    """Components of a text-to-image diffusion model, wired the way diffusers wires them."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    scheduler: object  # any diffusers scheduler; training and sampling derive theirs from its config
    vae: AutoencoderKL | None = None

    @property
    def device(self) -> torch.device:
        # Not ``unet.device``: diffusers first walks every submodule looking for offloading
        # hooks (about 3 ms on the testbed UNet), and every noise prediction asks for the device.
        return next(self.unet.parameters()).device

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels if self.vae else self.unet.config.in_channels

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae else 1

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def modules(self) -> dict[str, torch.nn.Module]:
        parts = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.vae is not None:
            parts["vae"] = self.vae
        return parts

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """Every parameter, named ``<component>.<name>`` (e.g. ``unet.conv_in.weight``)."""
        for prefix, module in self.modules().items():
            for name, param in module.named_parameters():
                yield f"{prefix}.{name}", param

    def num_parameters(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in module.parameters()) for name, module in self.modules().items()}

    def clone(self) -> "Bundle":
        """An independent deep copy (shakers never modify the bundle they are given)."""
        import copy

        return copy.deepcopy(self)

    def to(self, device: str | torch.device) -> "Bundle":
        for module in self.modules().values():
            module.to(device)
        return self

    def eval(self) -> "Bundle":
        for module in self.modules().values():
            module.eval()
        return self

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states ``[N, tokens, dim]``: the UNet's cross-attention context."""
        return self.text_encoder(self.tokenize(prompts))[0]

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> what the UNet denoises (pixels in [-1, 1], or VAE latents)."""
        x = images.to(self.device) * 2.0 - 1.0
        if self.vae is None:
            return x
        if x.shape[1] != self.vae.config.in_channels:
            x = x.expand(-1, self.vae.config.in_channels, -1, -1)
        # The posterior mean, not a sample: deterministic, so latents can be cached.
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def to_images(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_model_space`: back to images in [0, 1]."""
        if self.vae is not None:
            z = self.vae.decode(z / self.vae.config.scaling_factor).sample
        return ((z + 1.0) / 2.0).clamp(0.0, 1.0)

    def save(self, folder: str | Path) -> Path:
        """Write the bundle in diffusers' layout (safetensors weights)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index = {"_class_name": "StableDiffusionPipeline" if self.vae else "S2LGuardPixelBundle"}
        import diffusers

        index["_diffusers_version"] = diffusers.__version__
        for name, part in [("unet", self.unet), ("text_encoder", self.text_encoder), ("tokenizer", self.tokenizer),
                           ("scheduler", self.scheduler), ("vae", self.vae)]:  # fmt: skip
            if part is None:
                index[name] = [None, None]
                continue
            library = "transformers" if type(part).__module__.startswith("transformers") else "diffusers"
            index[name] = [library, type(part).__name__]
            part.save_pretrained(folder / name)
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        return folder


def build_tokenizer(words: Sequence[str] = TESTBED_WORDS, *, max_tokens: int = 8) -> CLIPTokenizer:
    """A CLIP BPE tokenizer built offline: every byte, plus one merge chain per known word.

    Unknown words still tokenize (into bytes); the merges only make known words one token.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2/CLIP byte alphabet

    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            if (merged, part) not in merges:
                merges.append((merged, part))
            merged += part
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_tokens)


def build_testbed_bundle(config: ModelConfig, *, image_size: int = 8, channels: int = 1, seed: int = 0) -> Bundle:
    """A freshly initialised pixel-space bundle for the testbed (seeded)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(max_tokens=config.max_tokens)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden_size,
            intermediate_size=config.text_hidden_size * 2,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    levels = len(config.block_out_channels)
    # No attention at full resolution: on 8x8 images it doubles the step time for little gain.
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    unet = UNet2DConditionModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,  # Stable Diffusion's convention; diffusers warns about 0
    )
    return Bundle(tokenizer, text_encoder, unet, scheduler).eval()


def load_bundle(folder: str | Path, *, trust_pickle: bool = False, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle, or a Stable Diffusion v1 folder, from diffusers' layout.

    Args:
        folder: holds ``model_index.json`` and one sub-folder per component.
        trust_pickle: allow ``.bin``/``.ckpt`` weights, which can run code when loaded.
        device: where to put the modules.

    Raises:
        BundleError: a component is missing, has the wrong shape, or non-finite weights.
        UnsafeWeightsError: a component has only pickle weights and ``trust_pickle`` is False.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise BundleError(f"{folder} has no model_index.json; point at a diffusers-format model folder (see docs/model-folders.md)")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{index_path} is not valid JSON ({exc.msg}); restore it from the original model") from None
    missing = [name for name in REQUIRED if not _listed(index, name)]
    if missing:
        raise BundleError(f"{index_path} lists no {', '.join(missing)}; a bundle needs {', '.join(REQUIRED)} (vae optional)")
    parts = {name: _load_component(folder, name, index[name], trust_pickle) for name in REQUIRED + ("vae",) if _listed(index, name)}
    bundle = Bundle(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["scheduler"], parts.get("vae"))
    _check_shapes(bundle, folder)
    _check_finite(bundle, folder)
    return bundle.to(device).eval()


def _listed(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def _load_component(folder: Path, name: str, entry: list, trust_pickle: bool):
    library, class_name = entry
    sub = folder / name
    if library not in ALLOWED_LIBRARIES:
        raise BundleError(f"{folder}/model_index.json: {name} comes from library {library!r}; only {ALLOWED_LIBRARIES} are loaded")
    if not sub.is_dir():
        raise BundleError(f"{sub} is missing but model_index.json lists {name}; restore the folder or set {name} to [null, null]")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise BundleError(f"{folder}/model_index.json: {library} has no class {class_name} for {name}; check the class name")
    kwargs = {}
    if name in ("unet", "text_encoder", "vae"):
        has_safe = any(sub.glob("*.safetensors"))
        pickles = [p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if not has_safe and pickles and not trust_pickle:
            raise UnsafeWeightsError(
                f"{sub} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
                "convert them to safetensors, or load with trust_pickle=True (--trust-pickle) only if you trust the source"
            )
        if not has_safe and not pickles:
            raise BundleError(f"{sub} holds no weights (*.safetensors); the folder is incomplete")
        kwargs["use_safetensors"] = has_safe
    try:
        return cls.from_pretrained(sub, **kwargs)
    except Exception as exc:  # library errors vary; name the component and keep the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"cannot load {name} from {sub}: {first}") from exc


def _check_shapes(bundle: Bundle, folder: Path) -> None:
    unet, text = bundle.unet.config, bundle.text_encoder.config
    if unet.cross_attention_dim != text.hidden_size:
        raise BundleError(
            f"{folder}: unet.cross_attention_dim = {unet.cross_attention_dim} but text_encoder.hidden_size = "
            f"{text.hidden_size}; the two components come from different models"
        )
    if bundle.vae is not None and bundle.vae.config.latent_channels != unet.in_channels:
        raise BundleError(
            f"{folder}: vae.latent_channels = {bundle.vae.config.latent_channels} but unet.in_channels = "
            f"{unet.in_channels}; the two components come from different models"
        )
    if bundle.vae is None and unet.in_channels not in (1, 3):
        raise BundleError(f"{folder}: a pixel-space unet needs 1 or 3 input channels, got {unet.in_channels}; add the vae")
    if len(bundle.tokenizer) > text.vocab_size:
        raise BundleError(f"{folder}: tokenizer has {len(bundle.tokenizer)} tokens but the text encoder only {text.vocab_size}")


def _check_finite(bundle: Bundle, folder: Path) -> None:
    for name, param in bundle.named_parameters():
        if not torch.isfinite(param).all():
            raise BundleError(f"{folder}: weight {name} holds NaN or infinite values; the checkpoint is corrupt, re-export it")


def merge_adapters(model: torch.nn.Module) -> None:
    """Fold every peft adapter (LoRA) into its base layer and put the base layer back in its place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in adapted:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    # inject_adapter_in_model leaves its config on the model; a plain model has none.
    if hasattr(model, "peft_config"):
        del model.peft_config

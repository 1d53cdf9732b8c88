"""Utility of a (defended) model, measured from outside the threat model.

A digits classifier trained on all of scikit-learn's digits plays the part the
Inception network plays behind FID: an evaluator the model never saw, giving
the conditional accuracy of generations (does "a handwritten digit seven"
draw a 7?) and a Frechet distance between generated and real images in its
hidden-layer feature space. A defense that stops leakage by ruining the model
shows up here.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg
from sklearn.neural_network import MLPClassifier

from .errors import S2LError

DIGITS_SIZE = 8  # load_digits' images are 8x8, values 0..16


@dataclass(frozen=True)
class DigitsEvaluator:
    classifier: MLPClassifier

    def _inputs(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if x.ndim != 4 or x.shape[1:] != (1, DIGITS_SIZE, DIGITS_SIZE):
            raise S2LError(f"the digits evaluator takes [N, 1, 8, 8] images in [0, 1], got shape {tuple(x.shape)}")
        return x.reshape(len(x), -1).astype(np.float64)

    def predict(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """The digit (0-9) each image shows."""
        return self.classifier.predict(self._inputs(images))

    def features(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Hidden-layer activations: the feature space of the Frechet distance."""
        x = self._inputs(images)
        return np.maximum(x @ self.classifier.coefs_[0] + self.classifier.intercepts_[0], 0.0)  # relu, as trained


@functools.lru_cache(maxsize=4)
def digits_evaluator(seed: int = 0) -> DigitsEvaluator:
    """The evaluator, trained once per process on all 1797 digits scaled to [0, 1]."""
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    digits = load_digits()
    classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed)
    classifier.fit(digits.data / 16.0, digits.target)
    return DigitsEvaluator(classifier)


def conditional_accuracy(evaluator: DigitsEvaluator, images: torch.Tensor | np.ndarray, digit: int) -> float:
    """Share of ``images`` the evaluator reads as ``digit``."""
    if len(images) == 0:
        raise S2LError("conditional accuracy needs at least one image")
    return float(np.mean(evaluator.predict(images) == digit))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]`` (FID's formula).

    ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)).
    """
    if len(a) < 2 or len(b) < 2:
        raise S2LError(f"a Frechet distance needs at least 2 samples per side, got {len(a)} and {len(b)}")
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    live = (a.var(0) + b.var(0)) > 0  # dead relu units add nothing to the trace but make C singular
    if not live.any():
        return mean_term
    cov_a, cov_b = np.atleast_2d(np.cov(a[:, live], rowvar=False)), np.atleast_2d(np.cov(b[:, live], rowvar=False))
    with warnings.catch_warnings():  # a rank-deficient product (fewer samples than features) still has a root
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = np.real(linalg.sqrtm(cov_a @ cov_b))  # tiny imaginary parts are numerical noise
    return max(mean_term + float(np.trace(cov_a + cov_b - 2.0 * root)), 0.0)


FEATURE_GRID = 8  # generic features are average-pooled to at most 8x8 per channel: a covariance small enough to estimate


@torch.no_grad()
def model_features(bundle, images: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
    """Features for a Frechet distance on any data, with nothing downloaded: the VAE encoder's
    posterior means for a latent model, else the pixels, average-pooled to at most 8x8 per channel."""
    out = []
    for chunk in images.split(batch_size):
        x = bundle.to_model_space(chunk) if bundle.vae is not None else chunk.to(bundle.device)
        x = torch.nn.functional.adaptive_avg_pool2d(x.float(), min(FEATURE_GRID, x.shape[-1]))
        out.append(x.flatten(1).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def is_digits_data(dataset) -> bool:
    """Whether the digits evaluator can read this data: 8x8 grey images of digitN domains (the testbed)."""
    return tuple(dataset.images.shape[1:]) == (1, DIGITS_SIZE, DIGITS_SIZE) and any(_digit(name) is not None for name in dataset.domains)


def _digit(name: str) -> int | None:
    rest = name.removeprefix("digit")
    return int(rest) if rest != name and rest.isdigit() else None


def model_utility(provider, bundle, dataset, config, *, seed: int) -> dict:
    """Utility of the deployed model as its users get it, for every domain of the data set.

    Generations come through ``provider`` (so a generate API that withholds outputs
    costs utility here); ``bundle`` is the auditor's handle for the denoising loss on
    held-out images (members' loss beside it shows the generalisation gap). On the
    testbed's digits an MLP classifier reads each generation (conditional accuracy) and
    its hidden layer is the Frechet distance's feature space; on any other data there is
    no reader, and the distance is taken in :func:`model_features`' space.
    """
    from .training import denoising_losses

    u, r = config.utility, config.report
    digits = is_digits_data(dataset)
    evaluator = digits_evaluator() if digits else None
    domains = [name for name in sorted(dataset.domains) if _digit(name) is not None] if digits else sorted(dataset.domains)
    per_domain, served_images = {}, []
    for i, name in enumerate(domains):
        generated = provider.generate([dataset.domain_caption(name)] * u.samples_per_domain, steps=u.sampler_steps,
                                      guidance_scale=u.guidance_scale, seed=seed + i, batch_size=r.batch_size)  # fmt: skip
        served = len(generated.images)
        accuracy = conditional_accuracy(evaluator, generated.images, _digit(name)) if served and evaluator else None
        per_domain[name] = {"conditional_accuracy": accuracy, "served": served, "requested": u.samples_per_domain}
        served_images.append(generated.images)
    generated_all = torch.cat(served_images)
    real = dataset.images[[i for i, rec in enumerate(dataset.records) if rec.domain in domains]]
    given = load_feature_model(u.feature_model) if u.feature_model else None
    if given:
        features = given.features
    elif evaluator:
        features = evaluator.features
    else:
        features = lambda images: model_features(bundle, images, batch_size=r.batch_size)  # noqa: E731
    fd = frechet_distance(features(generated_all), features(real)) if len(generated_all) >= 2 else None
    accuracies = [d["conditional_accuracy"] for d in per_domain.values() if d["conditional_accuracy"] is not None]

    def loss(membership: str) -> float | None:
        part = dataset.select(membership=membership)
        if len(part) == 0:
            return None
        captions = [rec.text for rec in part.records]
        return float(denoising_losses(bundle, part.images, captions, timesteps=r.loss_timesteps, draws=r.loss_draws, seed=seed).mean())

    if given:
        read = "read by an MLP digits classifier trained on all of load_digits" if evaluator else "unread (conditional accuracy is not measured)"
        reader = f"{read}; Frechet distance in the pooled output of the local model {given.path} against {len(real)} real images"
    elif evaluator:
        reader = f"read by an MLP digits classifier trained on all of load_digits; Frechet distance in its hidden layer against {len(real)} real testbed images"
    else:
        space = "the model's VAE encoder (posterior means)" if bundle.vae is not None else "pixel space"
        reader = (f"unread (no classifier knows this data: conditional accuracy is not measured); Frechet distance in {space}, "
                  f"average-pooled to at most {FEATURE_GRID}x{FEATURE_GRID} per channel, against {len(real)} real images")  # fmt: skip
    return {
        "status": "ok",
        "evaluator": "digits" if evaluator else None,
        "conditional_accuracy_mean": float(np.mean(accuracies)) if accuracies else None,
        "served_share": float(sum(d["served"] for d in per_domain.values()) / (u.samples_per_domain * len(domains))),
        "frechet_distance": fd,
        "real_images": len(real),
        "heldout_denoising_loss": loss("nonmember"),
        "member_denoising_loss": loss("member"),
        "domains": per_domain,
        "method": f"{u.samples_per_domain} generations per domain ({u.sampler_steps} DDIM steps, guidance {u.guidance_scale}) {reader}; "
                  f"denoising loss at timesteps {list(r.loss_timesteps)} x {r.loss_draws} draws",
    }  # fmt: skip


@dataclass(frozen=True)
class FeatureModel:
    """A local vision model (transformers) as the Frechet distance's feature space: its image
    processor prepares the images, its pooled output (or mean hidden state) is the feature."""

    model: Any
    processor: Any
    path: str

    @torch.no_grad()
    def features(self, images: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        out = []
        for chunk in images.split(batch_size):
            rgb = chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk  # grey images as RGB
            pixels = (rgb.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
            inputs = self.processor(images=list(pixels), return_tensors="pt")
            output = self.model(pixel_values=inputs["pixel_values"])
            pooled = getattr(output, "pooler_output", None)
            out.append((pooled if pooled is not None else output.last_hidden_state.mean(1)).float().numpy())
        return np.concatenate(out).astype(np.float64)


@functools.lru_cache(maxsize=2)
def load_feature_model(path: str) -> FeatureModel:
    """[utility] feature_model: a folder saved by transformers (``save_pretrained`` of the model and
    its image processor), read from disk only, safetensors weights only."""
    from transformers import AutoImageProcessor, AutoModel

    folder = Path(path)
    if not (folder / "config.json").is_file() or not (folder / "preprocessor_config.json").is_file():
        raise S2LError(f"[utility] feature_model = {path!r} needs config.json and preprocessor_config.json; "
                       "save the model and its image processor there with save_pretrained")  # fmt: skip
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise S2LError(
            f"[utility] feature_model = {path!r} could not be loaded ({exc}); give a transformers vision model folder with safetensors weights"
        ) from None
    return FeatureModel(model, processor, str(folder))

"""Fine-tune API filter: refuse S2L-like requests.

S2L fine-tunes on the model's own generations. Those lie where the model puts
its probability mass, so the provider's own model denoises them unusually
well. The filter scores a request by the mean denoising loss of its images
under the deployed model (fixed timesteps and noise) and refuses it when that
mean falls below a threshold. The threshold is calibrated on real, benign
fine-tuning sets - bootstrap sets of the request's size drawn from a pool of
real images the provider holds - to a chosen false-rejection rate; a held-out
half of the pool measures the rate it really has.

Two limits complete it: requests asking for more than ``max_steps`` steps are
refused, and a trained model whose weights moved more than ``max_drift``
(relative L2 over the shared weights) is not deployed.

What it cannot see: an attacker who knows the filter can perturb the SP
images, mix in real ones or send fewer (the S2L run measures those
adaptive requests), and under open-weights there is no API to filter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from s2l_guard.data import load_imagefolder
from s2l_guard.errors import ConfigError, SettingsError
from s2l_guard.metrics import rate_with_interval
from s2l_guard.model import Bundle
from s2l_guard.provider import FinetuneRequest
from s2l_guard.testbed import unused_digits
from s2l_guard.training import denoising_losses

from .base import DEFENSES, Defense, Review


@dataclass(frozen=True)
class FinetuneFilterSettings:
    false_rejection_rate: float = 0.05  # target share of benign requests refused
    calibration_sets: int = 2000  # bootstrap benign sets per request size
    # predictive: each calibration set first resamples the pool, so the threshold allows for how
    # little a finite pool says about the mean of a large request; plain: sets straight from the pool
    calibration: str = "predictive"
    timesteps: tuple[int, ...] = (50, 100, 200, 400)
    draws: int = 2  # noise draws per timestep
    max_steps: int = 1000  # 0: no limit
    max_drift: float = 0.05  # relative L2 change of the shared weights; 0: no limit
    benign_data: str = ""  # imagefolder of real images the provider holds; "" = the testbed's unused digits
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.false_rejection_rate < 1:
            raise SettingsError(f"false_rejection_rate must be in (0, 1), got {self.false_rejection_rate}")
        if self.calibration not in ("predictive", "plain"):
            raise SettingsError(f"calibration must be 'predictive' or 'plain', got {self.calibration!r}")
        if self.calibration_sets < 100:
            raise SettingsError(f"calibration_sets must be >= 100, got {self.calibration_sets}")
        if not self.timesteps or self.draws < 1:
            raise SettingsError("finetune_filter needs at least one timestep and one draw")
        if self.max_steps < 0 or self.max_drift < 0:
            raise SettingsError("max_steps and max_drift must be >= 0 (0 disables the limit)")


def bootstrap_set_means(losses: np.ndarray, size: int, sets: int, seed: int) -> np.ndarray:
    """Means of ``sets`` random sets of ``size`` images drawn with replacement from ``losses``."""
    rng = np.random.default_rng([seed, size])
    return losses[rng.integers(0, len(losses), (sets, size))].mean(1)


def predictive_set_means(losses: np.ndarray, size: int, sets: int, seed: int) -> np.ndarray:
    """Means of ``sets`` new benign sets of ``size`` images as a finite pool predicts them.

    Each set draws from its own bootstrap resample of the pool, so the spread holds the
    pool's uncertainty about the population mean (variance ~ s^2/size + s^2/pool) besides
    the set's own; without it a 328-image pool sets the threshold for 100-image requests
    far too tight (the testbed's held-out rate was 0.155 for a 0.05 target).
    """
    rng = np.random.default_rng([seed, size, 1])
    n, out = len(losses), np.empty(sets)
    for k in range(sets):  # only the resampled positions a set picks are drawn; repeats share theirs
        positions, which = np.unique(rng.integers(0, n, size), return_inverse=True)
        out[k] = losses[rng.integers(0, n, len(positions))][which].mean()
    return out


def relative_drift(base: Bundle, shaken: Bundle) -> float:
    """||theta' - theta|| / ||theta|| over every weight; rows a method added (TI tokens) count in full."""
    before = dict(base.named_parameters())
    change = norm = 0.0
    for name, after in shaken.named_parameters():
        old = before.get(name)
        if old is None:
            change += float(after.detach().double().pow(2).sum())
            continue
        rows = min(len(old), len(after)) if old.dim() and after.dim() else None
        shared_old, shared_new = (old[:rows], after[:rows]) if rows is not None else (old, after)
        change += float((shared_new.detach().double() - shared_old.detach().double()).pow(2).sum())
        change += float(after[rows:].detach().double().pow(2).sum()) if rows is not None else 0.0
        norm += float(old.detach().double().pow(2).sum())
    return (change / norm) ** 0.5 if norm else float("inf")


@DEFENSES.register
class FinetuneFilter(Defense):
    name = "finetune_filter"
    paper = "https://arxiv.org/abs/2403.09450"
    summary = "the fine-tune API refuses self-generated data (denoising-loss detector), long jobs and large drift"
    threat_models = ("finetune-api",)
    points = ("finetune",)
    Settings = FinetuneFilterSettings
    tiny_settings = {"calibration_sets": 200}

    def __init__(self, settings=None):
        super().__init__(settings)
        self.pool_losses: np.ndarray | None = None
        self.calibration_losses: np.ndarray | None = None
        self.heldout_losses: np.ndarray | None = None
        self._bundle: Bundle | None = None

    # -- calibration
    def prepare(self, bundle: Bundle, dataset, config) -> None:
        images, captions = self._benign_pool(config)
        losses = self.image_losses(bundle, images, captions)
        order = np.random.default_rng(self.settings.seed).permutation(len(losses))
        half = len(losses) // 2
        self.pool_losses = losses
        self.calibration_losses, self.heldout_losses = losses[order[:half]], losses[order[half:]]
        self._bundle = bundle
        self.threshold.cache_clear()

    def _benign_pool(self, config) -> tuple[torch.Tensor, list[str]]:
        s = self.settings
        if s.benign_data:
            data = load_imagefolder(s.benign_data)
            images, captions = data.images, [r.text for r in data.records]
        else:
            array, captions, _ = unused_digits(config.testbed, config.run.seed)
            images = torch.from_numpy(array)
        if len(images) < 20:
            raise ConfigError(f"[defenses.finetune_filter] benign_data holds {len(images)} images; calibration needs at least 20 real images")
        return images, captions

    def image_losses(self, bundle: Bundle, images: torch.Tensor, captions: list[str]) -> np.ndarray:
        """Each image's mean denoising loss under the deployed model (fixed noise: reproducible)."""
        s = self.settings
        steps = bundle.scheduler.config.num_train_timesteps
        if max(s.timesteps) >= steps:
            raise ConfigError(
                f"[defenses.finetune_filter] timesteps {list(s.timesteps)} reach past the model's {steps} training timesteps; use values below {steps}"
            )
        return denoising_losses(bundle, images, captions, timesteps=s.timesteps, draws=s.draws, seed=s.seed).numpy()

    @functools.lru_cache(maxsize=64)
    def threshold(self, size: int) -> float:
        """Requests of ``size`` images whose mean loss is below this are refused."""
        if self.calibration_losses is None:
            raise RuntimeError("finetune_filter used before prepare(): the provider must calibrate it first")
        return self._fit(self.calibration_losses, size, self.settings.seed)

    def _fit(self, losses: np.ndarray, size: int, seed: int) -> float:
        s = self.settings
        means = (predictive_set_means if s.calibration == "predictive" else bootstrap_set_means)(losses, size, s.calibration_sets, seed)
        return float(np.quantile(means, s.false_rejection_rate))

    # -- reports
    def detection(self, losses: np.ndarray, size: int, sets: int = 1000, seed: int = 1) -> dict[str, Any]:
        """Share of bootstrap sets of ``size`` images from a set (per-image ``losses``) the detector refuses."""
        means = bootstrap_set_means(losses, size, sets, seed)
        return {"size": size, **rate_with_interval(int((means < self.threshold(size)).sum()), len(means))}

    def heldout_false_rejection(self, size: int, sets: int = 2000, splits: int = 20) -> dict[str, Any]:
        """The false-rejection rate on benign sets from the held-out half of the pool, and across
        ``splits`` random re-splits of the pool (calibrate on one half, measure on the other):
        the spread across splits is the sampling error a finite pool leaves, which the
        interval of one split's sets does not show."""
        rates = []
        for r in range(splits):
            order = np.random.default_rng([self.settings.seed, r, 2]).permutation(len(self.pool_losses))
            a, b = self.pool_losses[order[: len(order) // 2]], self.pool_losses[order[len(order) // 2 :]]
            rates.append(float((bootstrap_set_means(b, size, sets, seed=r) < self._fit(a, size, seed=r)).mean()))
        across = {"mean": float(np.mean(rates)), "range95": [float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))], "splits": splits}
        return {"target": self.settings.false_rejection_rate, **self.detection(self.heldout_losses, size, sets, seed=self.settings.seed + 7),
                "across_splits": across}  # fmt: skip

    # -- the API
    def review(self, bundle: Bundle, request: FinetuneRequest) -> Review:
        s = self.settings
        steps = getattr(request.shaker.settings, "steps", 0)
        if s.max_steps and steps > s.max_steps:
            return Review(False, f"asks for {steps} steps; the API allows {s.max_steps}", {"steps": steps})
        images, captions = request.data.images, list(request.data.captions)
        statistic = float(self.image_losses(bundle, images, captions).mean())
        threshold = self.threshold(len(images))
        evidence = {"statistic": statistic, "threshold": threshold, "images": len(images)}
        if statistic < threshold:
            return Review(False, f"the images look self-generated (mean denoising loss {statistic:.4f} < {threshold:.4f})", evidence)
        return Review(True, "", evidence)

    def review_result(self, base: Bundle, shaken: Bundle, request: FinetuneRequest) -> Review:
        drift = relative_drift(base, shaken)
        if self.settings.max_drift and drift > self.settings.max_drift:
            return Review(
                False, f"the trained weights moved {drift:.3f} (relative L2); the API deploys at most {self.settings.max_drift}", {"drift": drift}
            )
        return Review(True, "", {"drift": drift})

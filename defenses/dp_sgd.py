"""DP-SGD pre-training: the whole pre-training run is differentially private.

Abadi et al. (2016) through opacus: Poisson-sampled batches, per-sample
gradients clipped to ``max_grad_norm``, Gaussian noise calibrated by the
accountant to ``target_epsilon`` at ``delta`` over the [pretrain] steps. The
epsilon reported is the accountant's. Carlini et al. (2023) note DP-SGD is the
principled defense against extraction but costly in utility; the utility
columns show that cost.

The unit of privacy is a training *row*: a member the data set repeats
``copies`` times is protected only at group level (epsilon grows with the
group size), which is exactly the case the testbed's duplicated members model.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from s2l_guard.privacy_settings import PrivacySettings

from .base import DEFENSES, Defense, PretrainContext

DPSGDSettings = PrivacySettings  # the defense's settings are the guarantee it trains for, nothing more


def privacy_settings(s: PrivacySettings) -> PrivacySettings:
    """The privacy part of a DP defense's settings (which may add fields of their own)."""
    return PrivacySettings(**{f.name: getattr(s, f.name) for f in fields(PrivacySettings)})


def last_losses(losses: list[float], n: int = 50) -> float | None:
    """Mean of the last ``n`` step losses; an empty Poisson batch logs NaN and is skipped."""
    tail = [x for x in losses[-n:] if x == x]
    return sum(tail) / len(tail) if tail else None


def privacy_summary(result) -> dict:
    return {"epsilon": result.epsilon, "delta": result.delta, "noise_multiplier": result.noise_multiplier,
            "sample_rate": result.sample_rate, "steps": result.steps, "accountant": result.accountant,
            "expected_batch_size": result.expected_batch_size}  # fmt: skip


@DEFENSES.register
class DPSGD(Defense):
    name = "dp_sgd"
    paper = "https://arxiv.org/abs/1607.00133"
    summary = "pre-train with DP-SGD (opacus): clipped per-sample gradients plus calibrated noise"
    threat_models = ("open-weights", "finetune-api", "generate-api")
    points = ("training",)
    Settings = DPSGDSettings
    tiny_settings = {"physical_batch_size": 8}

    def pretrain(self, context: PretrainContext):
        from s2l_guard.privacy import train_private
        from s2l_guard.training import pretrain_trainable

        images, captions = context.dataset.training_set()
        bundle = context.new_bundle()
        p = context.config.pretrain
        trainable = pretrain_trainable(bundle, context.config)
        optimizer = torch.optim.AdamW(trainable.values(), lr=p.learning_rate, weight_decay=p.weight_decay)
        result = train_private(bundle, images, captions, trainable=trainable, optimizer=optimizer,
                               settings=context.train_settings, privacy=privacy_settings(self.settings), description="dp-pretrain",
                               on_step=context.progress(p.steps, "dp-pretrain"))  # fmt: skip
        if p.release == "ema":  # averaging released DP weights is post-processing: epsilon is unchanged
            result.ema.copy_to(trainable.values())
        summary = {"training_images": len(images), "steps": p.steps, "privacy": privacy_summary(result),
                   "loss_last_50": last_losses(result.losses)}  # fmt: skip
        return bundle, summary

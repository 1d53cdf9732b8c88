"""Anneal before release: continue pre-training with the learning rate decayed to zero.

Stable Diffusion v1 was pre-trained at a constant rate and released as it stood (its EMA
weights). The calibration (docs/calibration) found that on such a model *any* gentle
fine-tune raises membership inference - the fine-tune acts as the learning-rate decay
pre-training never had - and with it S2L's apparent amplification. If so, the provider can
take that step itself: continue training the released model on the same data for a few
more steps while the rate falls to zero (and optionally release the average of those
steps' weights), so a fine-tune has no decay left to supply. The cost is ``steps`` extra
training steps on top of the undefended pre-training, which is reused from the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from s2l_guard.errors import InputError, SettingsError

from .base import DEFENSES, Defense, PretrainContext


@dataclass(frozen=True)
class AnnealSettings:
    steps: int = 200  # extra steps, at [pretrain] batch size, on the pre-training data
    schedule: str = "cosine"  # how the rate falls to zero: "cosine" or "linear" (diffusers get_scheduler)
    learning_rate: float = 0.0  # the rate the decay starts from; 0: [pretrain] learning_rate
    warmup_steps: int = 10  # fresh AdamW moments take a few steps to settle before the decay
    ema_decay: float = 0.0  # > 0: release the moving average of the annealing steps' weights

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise SettingsError(f"anneal steps must be >= 1, got {self.steps}")
        if self.schedule not in ("cosine", "linear"):
            raise SettingsError(f"anneal schedule must be 'cosine' or 'linear' (a decay to zero), got {self.schedule!r}")
        if self.learning_rate < 0:
            raise SettingsError(f"anneal learning_rate must be >= 0 (0: the pre-training rate), got {self.learning_rate}")
        if not 0 <= self.warmup_steps < self.steps:
            raise SettingsError(f"anneal warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if not 0 <= self.ema_decay < 1:
            raise SettingsError(f"anneal ema_decay must be in [0, 1), got {self.ema_decay}")


@DEFENSES.register
class Anneal(Defense):
    name = "anneal"
    paper = "https://arxiv.org/abs/2403.09450"
    summary = "continue pre-training with the rate decayed to zero (optionally EMA) before release"
    threat_models = ("open-weights", "finetune-api", "generate-api")
    points = ("training",)
    Settings = AnnealSettings
    tiny_settings = {"steps": 6, "warmup_steps": 1, "ema_decay": 0.5}

    def pretrain(self, context: PretrainContext):
        from s2l_guard.training import pretrain_trainable, train

        s, p = self.settings, context.config.pretrain
        if context.undefended is None:
            raise InputError("the anneal defense needs the undefended pre-trained model; run it through s2l_guard.runner.stages.pretrain_stage")
        bundle, base_summary = context.undefended()
        images, captions = context.dataset.training_set()
        trainable = pretrain_trainable(bundle, context.config)
        optimizer = torch.optim.AdamW(trainable.values(), lr=s.learning_rate or p.learning_rate, weight_decay=p.weight_decay)
        # Steps continue after pre-training's, with draws of their own (a seed pre-training never used).
        settings = replace(context.train_settings, steps=s.steps, seed=context.config.run.seed + 1_000_000,
                           lr_schedule=s.schedule, warmup_steps=s.warmup_steps, ema_decay=s.ema_decay)  # fmt: skip
        start = time.perf_counter()
        result = train(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=settings,
                       checkpoint_dir=context.workdir, description="anneal", on_step=context.progress(s.steps, "anneal"))  # fmt: skip
        if s.ema_decay:
            result.ema.copy_to(trainable.values())
        summary = dict(base_summary)
        summary["anneal"] = {"steps": s.steps, "schedule": s.schedule, "learning_rate": s.learning_rate or p.learning_rate,
                             "warmup_steps": s.warmup_steps, "ema_decay": s.ema_decay, "released": "ema" if s.ema_decay else "raw",
                             "extra_steps_share": s.steps / p.steps, "seconds": round(time.perf_counter() - start, 2),
                             "loss_last_50": sum(result.losses[-50:]) / max(1, len(result.losses[-50:]))}  # fmt: skip
        return bundle, summary

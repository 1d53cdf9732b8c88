"""DP-SGD's step time against the plain step's, side by side in one run (issue 15 item 5).

    .venv/bin/python benchmarks/dp_step.py [--config standard] [--steps 6] [--threads N]

The testbed model at the profile's shape is pre-trained for a few steps at the profile's
batch size, once by ``training.train`` and once through ``privacy.train_private`` for each
opacus per-sample gradient mode the toolkit allows (``[defenses.dp_sgd] grad_sample_mode``),
physical batches as ``[defenses.dp_sgd] physical_batch_size`` says. Printed: the median
seconds per step after the first, and the DP / plain ratio (goal: at most 2).
DP batches are Poisson-sampled, so their sizes vary around the plain batch size; the
ratio is per logical step, as pre-training counts them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from s2l_guard.cli import config_path
from s2l_guard.config import load_config
from s2l_guard.model import build_testbed_bundle
from s2l_guard.privacy import train_private
from s2l_guard.privacy_settings import GRAD_SAMPLE_MODES, PrivacySettings
from s2l_guard.runner.settings import defense_settings
from s2l_guard.training import TrainSettings, pretrain_trainable, train


def seconds_per_step(config, steps: int, privacy: PrivacySettings | None) -> float:
    bundle = build_testbed_bundle(config.model, seed=0)
    batch = config.pretrain.batch_size
    images = torch.rand(batch * 8, *bundle.latent_shape, generator=torch.Generator().manual_seed(0))
    captions = [f"a handwritten digit {'five' if i % 2 else 'six'}" for i in range(len(images))]
    trainable = pretrain_trainable(bundle, config)
    optimizer = torch.optim.AdamW(trainable.values(), lr=config.pretrain.learning_rate)
    settings = TrainSettings(steps=steps, batch_size=batch, seed=0)
    stamps: list[float] = []
    on_step = lambda step, loss: stamps.append(time.perf_counter())  # noqa: E731
    if privacy is None:
        train(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=settings, on_step=on_step)
    else:
        train_private(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=settings, privacy=privacy, on_step=on_step)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))  # the first step is the warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="standard", help="a profile name under configs/ or a TOML path")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = config_path(args.config)
    config = load_config(path)
    dp = defense_settings(config, "dp_sgd")
    print(f"profile {path.name}, batch {config.pretrain.batch_size}, physical batches of {dp.physical_batch_size}, "
          f"torch threads {torch.get_num_threads()}, {args.steps} steps each")  # fmt: skip
    plain = seconds_per_step(config, args.steps, None)
    print(f"{'plain step':24s} {plain:7.3f} s")
    for mode in GRAD_SAMPLE_MODES:
        privacy = PrivacySettings(**{**{k: getattr(dp, k) for k in PrivacySettings.__dataclass_fields__}, "grad_sample_mode": mode})
        seconds = seconds_per_step(config, args.steps, privacy)
        print(
            f"{'DP step, ' + mode:24s} {seconds:7.3f} s   DP / plain {seconds / plain:5.2f}  (goal <= 2: {'met' if seconds / plain <= 2 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()

"""Throughput of the S2L parts on this machine: seconds per fine-tune step and per scored image.

    .venv/bin/python benchmarks/throughput.py [--profiles smoke standard] [--steps 5]

For each profile the testbed model is built at that profile's shape (weights do
not change the cost), every fine-tune method runs a few steps on random 8x8
images at the method's configured batch size, and every MIA scores a batch of
images. Numbers are medians over the timed steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from attacks.base import MIA, SHAKERS, FinetuneData
from s2l_guard.config import load_config
from s2l_guard.model import build_testbed_bundle
from s2l_guard.runner.settings import mia_settings, shaker_settings

ROOT = Path(__file__).resolve().parents[1]


def finetune_seconds_per_step(config, name: str, steps: int) -> tuple[int, float, int]:
    bundle = build_testbed_bundle(config.model, seed=0)
    settings = shaker_settings(config, name)
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = FinetuneData(images, ["a handwritten digit seven"] * 64, "a handwritten digit seven")
    stamps: list[float] = []
    shaker = SHAKERS.get(name)(type(settings)(**{**settings.__dict__, "steps": steps + 1}))
    result = shaker.shake(bundle, data, seed=0, callback=lambda step, b: stamps.append(time.perf_counter()), callback_every=1)
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))  # the first step (warm-up) is excluded
    return result.trainable_parameters, gaps[len(gaps) // 2], settings.batch_size


def mia_seconds_per_image(config, name: str, n: int) -> float:
    bundle = build_testbed_bundle(config.model, seed=0)
    attack = MIA.get(name)(mia_settings(config, name))
    images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    captions = ["a handwritten digit seven"] * n
    attack.score(bundle, images[:4], captions[:4], seed=0)  # warm-up
    start = time.perf_counter()
    attack.score(bundle, images, captions, seed=0)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["smoke", "standard"])
    parser.add_argument("--steps", type=int, default=5, help="timed fine-tune steps per method")
    parser.add_argument("--images", type=int, default=96, help="images scored per MIA")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for profile in args.profiles:
        config = load_config(ROOT / "configs" / f"{profile}.toml")
        print(f"\n[{profile}] model {config.model.block_out_channels}, text width {config.model.text_hidden_size}")
        print(f"{'method':<26} {'trainable':>10} {'batch':>5} {'s/step':>8}")
        for name in [n for n in SHAKERS.names() if n != "gaussian"]:
            params, seconds, batch = finetune_seconds_per_step(config, name, args.steps)
            print(f"{name:<26} {params:>10,} {batch:>5} {seconds:>8.4f}")
        print(f"{'mia':<26} {'s/image':>10}")
        for name in MIA.names():
            print(f"{name:<26} {mia_seconds_per_image(config, name, args.images):>10.5f}")


if __name__ == "__main__":
    main()

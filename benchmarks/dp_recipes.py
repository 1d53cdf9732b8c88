"""What each DP fine-tuning recipe keeps of the private digits (issue 15 item 1), one recipe a line.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dp_recipes.py [--config standard] \
        --recipe "eps=10" --recipe "eps=10 lora=4 lr=1e-2" --recipe "sigma_per_row=0.002" ...

Each recipe is private_finetune's second stage, run on the profile's private members from its
stored public pre-training (trained once and reused, as the defense does), then read by the digits
classifier: ``--samples`` generations per private digit, pooled accuracy with its Wilson interval.
Recipe keys (space-separated ``key=value``; the defense's defaults otherwise):

- ``eps``: target epsilon (``inf``: clipped, no noise); ``sigma_per_row``: instead of an epsilon,
  the noise's standard deviation on the *mean* clipped gradient in units of the clipping bound
  (noise multiplier / expected batch size) - the tolerance curve, privacy not accounted;
- ``batch``, ``steps``, ``lr`` (AdamW's, as the defense), ``clip`` (C), ``k`` (noise multiplicity),
  ``ema`` (EMA decay of the released weights), ``layers`` (comma-separated name parts),
  ``lora`` (rank of LoRA adapters on the attention projections inside ``layers``; trains only
  those, merged after), ``projections`` (which projections get adapters, comma-separated).

Printed: one JSON line per recipe (accuracy, its interval, the noise multiplier, the accountant's
epsilon, trainable parameters, seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from unittest import mock

import torch

from defenses.private_finetune import PROJECTIONS, private_trainable
from s2l_guard import privacy
from s2l_guard.cache import Store
from s2l_guard.cli import config_path
from s2l_guard.config import load_config
from s2l_guard.data import load_imagefolder
from s2l_guard.metrics import rate_with_interval
from s2l_guard.model import merge_adapters
from s2l_guard.privacy import train_private
from s2l_guard.privacy_settings import PrivacySettings
from s2l_guard.runner.stages import stored_standard_pretrain, testbed_stage
from s2l_guard.sampling import sample
from s2l_guard.training import TrainSettings
from s2l_guard.utility import _digit, digits_evaluator

DEFAULTS = {"eps": "10", "batch": "64", "steps": "300", "lr": "1e-3", "clip": "1.0", "k": "1", "ema": "0",
            "layers": "attn1.,attn2.", "lora": "0", "projections": ",".join(PROJECTIONS), "sigma_per_row": ""}  # fmt: skip


def parse_recipe(text: str) -> dict[str, str]:
    recipe = dict(DEFAULTS)
    for part in text.split():
        key, _, value = part.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"recipe key {key!r} is unknown; use {', '.join(DEFAULTS)}")
        recipe[key] = value
    return recipe


def run_recipe(recipe: dict[str, str], base, images, captions, config, private, evaluator, samples: int) -> dict:
    start = time.perf_counter()
    bundle = base.clone()
    rank = int(recipe["lora"])
    trainable = private_trainable(bundle, tuple(recipe["layers"].split(",")), rank, tuple(recipe["projections"].split(",")))
    optimizer = torch.optim.AdamW(trainable.values(), lr=float(recipe["lr"]))  # the defense's optimizer
    batch, steps = int(recipe["batch"]), int(recipe["steps"])
    settings = TrainSettings(steps=steps, batch_size=batch, caption_dropout=config.pretrain.caption_dropout, seed=config.run.seed,
                             ema_decay=float(recipe["ema"]))  # fmt: skip
    fixed = float(recipe["sigma_per_row"]) * batch if recipe["sigma_per_row"] else None
    eps = 10.0 if fixed is not None else float(recipe["eps"])  # a fixed noise: the accountant reports its epsilon
    settings_p = PrivacySettings(target_epsilon=eps, max_grad_norm=float(recipe["clip"]), physical_batch_size=256,
                                 noise_multiplicity=int(recipe["k"]))  # fmt: skip
    with mock.patch.object(privacy, "get_noise_multiplier", lambda **kw: fixed) if fixed is not None else contextlib.nullcontext():
        result = train_private(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=settings,
                               privacy=settings_p, description="recipe")  # fmt: skip
    if result.ema is not None:
        result.ema.copy_to(trainable.values())
    if rank:
        merge_adapters(bundle.unet)
    bundle.eval()
    hits = 0
    for i, (caption, digit) in enumerate(private.items()):
        generated = sample(bundle, [caption] * samples, steps=config.utility.sampler_steps,
                           guidance_scale=config.utility.guidance_scale, seed=1000 + i)  # fmt: skip
        hits += int((evaluator.predict(generated) == digit).sum())
    accuracy = rate_with_interval(hits, samples * len(private))
    return {"recipe": {k: v for k, v in recipe.items() if v != DEFAULTS[k]}, "accuracy": round(accuracy["rate"], 3),
            "ci95": [round(x, 3) for x in accuracy["ci95"]], "n": accuracy["n"], "noise_multiplier": round(result.noise_multiplier, 4),
            "sigma_per_row": round(result.noise_multiplier / batch, 5), "epsilon": result.epsilon, "delta": result.delta,
            "trainable": sum(q.numel() for q in trainable.values()), "final_loss_50": round(_mean_tail(result.losses), 4),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def _mean_tail(losses: list[float], n: int = 50) -> float:
    tail = [x for x in losses[-n:] if x == x]
    return sum(tail) / len(tail) if tail else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="standard", help="a profile name under configs/ or a TOML path")
    parser.add_argument("--recipe", action="append", default=[], help='e.g. "eps=10 lora=4 lr=1e-2" (repeatable)')
    parser.add_argument("--samples", type=int, default=40, help="generations per private digit")
    args = parser.parse_args()
    config = load_config(config_path(args.config))
    store = Store(config.run.store)
    dataset = load_imagefolder(testbed_stage(store, config).path)
    device = torch.device("cpu")
    public = dataset.select(membership="public")
    base, _ = stored_standard_pretrain(store, config, dataset, device, *public.training_set())
    members = dataset.select(membership="member")
    images, captions = members.training_set()
    private = {dataset.domain_caption(name): _digit(name) for name in sorted({r.domain for r in members.records})}  # caption -> digit
    evaluator = digits_evaluator()
    print(
        json.dumps({"profile": config.name, "private_rows": len(images), "private_digits": list(private.values()), "samples_per_digit": args.samples})
    )
    for text in args.recipe or [""]:
        print(json.dumps(run_recipe(parse_recipe(text), base, images, captions, config, private, evaluator, args.samples)), flush=True)


if __name__ == "__main__":
    main()

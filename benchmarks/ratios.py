"""The toolkit's hot paths against their floors, measured in one run (issue 16 item 2).

    .venv/bin/python benchmarks/ratios.py [--config standard] [--threads N] [--repeats 5]

Each line is one measured ratio, its goal, and whether it meets it:

- training step vs the machine's fp32 matmul rate for the same FLOPs (floor / actual, goal >= 0.5):
  one step of ``training.train`` (text encoder frozen, as in pre-training) at the pre-training
  batch, its forward and backward FLOPs counted by ``torch.utils.flop_counter``;
- each MIA's wall time vs the UNet forwards it makes x one forward's time at the same batch
  (goal <= 1.15): the forwards are counted as the MIA runs, then each batch size is timed alone;
- sampling (the sampler that makes SP sets and extraction candidates) vs its forwards x one
  forward's time at the sampler's batch (goal <= 1.05: at most 5% for the loop around them).
  The issue asks for diffusers' StableDiffusionPipeline as the reference, which needs a VAE
  the pixel-space testbed model has not; the forwards alone are a floor any loop must pay;
- extraction matching vs a ``torch.cdist`` floor over the same pairs at matching's own precision,
  float64 (goal <= 1.15), with the chunk bounding memory; then, without a goal, vs float32 cdist.

Weights do not change any of these costs, so the model is a freshly initialised one at the
profile's shape. Times are medians of ``--repeats`` runs after one warm-up; each ratio is the
median of per-repeat ratios, the measured run and its floor timed back to back.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.utils.flop_counter import FlopCounterMode

from attacks.base import MIA
from attacks.extraction import candidate_distances
from s2l_guard.cli import config_path
from s2l_guard.config import load_config
from s2l_guard.model import build_testbed_bundle
from s2l_guard.runner.settings import check_plugins, mia_settings
from s2l_guard.sampling import sample
from s2l_guard.training import TrainSettings, train

CAPTION = "a handwritten digit five"


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(repeats: int) -> float:
    """fp32 FLOP/s of a 1024 x 1024 matmul on this machine and thread count."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / median_seconds(lambda: a @ b, repeats * 4)


def paired(run, floor, repeats: int) -> tuple[float, float]:
    """Median seconds of ``run``, and the median of run / floor with the two timed back to back
    in every repeat: this host's speed drifts by up to 1.7x between minutes, and a ratio of two
    medians taken minutes apart reads that drift as overhead."""
    run(), floor()  # warm-up
    seconds, ratios = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        middle = time.perf_counter()
        floor()
        seconds.append(middle - start)
        ratios.append((middle - start) / (time.perf_counter() - middle))
    return statistics.median(seconds), statistics.median(ratios)


def forwards_only(bundle, counts: Counter):
    """A callable making the same UNet forwards (count and batch sizes) and nothing else."""
    inputs = {batch: (torch.randn(batch, *bundle.latent_shape), bundle.encode_prompts([CAPTION] * batch)) for batch in counts}

    @torch.no_grad()
    def run():
        for batch, n in counts.items():
            x, context = inputs[batch]
            for _ in range(n):
                bundle.unet(x, torch.full((batch,), 500), context)

    return run


def count_forwards(bundle, run) -> Counter:
    """How many UNet forwards ``run`` makes, by batch size."""
    counts: Counter = Counter()
    hook = bundle.unet.register_forward_pre_hook(lambda module, args: counts.update([len(args[0])]))
    try:
        run()
    finally:
        hook.remove()
    return counts


def training_ratio(config, rate: float, repeats: int) -> tuple[str, float, float]:
    bundle = build_testbed_bundle(config.model, seed=0)
    batch = config.pretrain.batch_size
    images = torch.rand(batch * 4, *bundle.latent_shape, generator=torch.Generator().manual_seed(0))
    trainable = {f"unet.{n}": p for n, p in bundle.unet.named_parameters()}
    steps = repeats + 1
    stamps: list[float] = []
    train(bundle, images, [CAPTION] * len(images), trainable=trainable, optimizer=torch.optim.AdamW(trainable.values(), lr=1e-4),
          settings=TrainSettings(steps=steps, batch_size=batch), on_step=lambda step, loss: stamps.append(time.perf_counter()))  # fmt: skip
    step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))  # the first step is the warm-up
    x = torch.randn(batch, *bundle.latent_shape)
    context = bundle.encode_prompts([CAPTION] * batch)
    bundle.unet.requires_grad_(True)  # train() leaves the weights frozen again
    with FlopCounterMode(display=False) as flops:
        bundle.unet(x, torch.full((batch,), 500), context).sample.pow(2).mean().backward()
    floor = flops.get_total_flops() / rate
    return f"training step (batch {batch}, {flops.get_total_flops() / 1e9:.1f} GFLOP)", floor / step, step


def mia_ratio(config, name: str, members: int, repeats: int) -> tuple[str, float, float]:
    bundle = build_testbed_bundle(config.model, seed=0)
    attack = MIA.get(name)(mia_settings(config, name))
    images = torch.rand(members, *bundle.latent_shape, generator=torch.Generator().manual_seed(0))
    run = lambda: attack.score(bundle, images, [CAPTION] * members, seed=0)  # noqa: E731
    counts = count_forwards(bundle, run)
    seconds, ratio = paired(run, forwards_only(bundle, counts), repeats)
    calls = ", ".join(f"{n} x {b}" for b, n in sorted(counts.items()))
    return f"MIA {name} on {members} images ({calls} forwards)", ratio, seconds


def sampling_ratio(config, repeats: int) -> tuple[str, float, float]:
    bundle = build_testbed_bundle(config.model, seed=0)
    e = config.extraction
    run = lambda: sample(bundle, [CAPTION] * e.candidates, steps=e.sampler_steps, guidance_scale=e.guidance_scale, batch_size=e.batch_size)  # noqa: E731
    counts = count_forwards(bundle, run)
    seconds, ratio = paired(run, forwards_only(bundle, counts), max(1, repeats // 2))
    return f"sampling {e.candidates} candidates, DDIM {e.sampler_steps}", ratio, seconds


def matching_ratio(config, training: int, repeats: int, floor_dtype: torch.dtype) -> tuple[str, float, float]:
    e = config.extraction
    g = torch.Generator().manual_seed(0)
    candidates = torch.rand(e.candidates, 1, 8, 8, generator=g)
    images = torch.rand(training, 1, 8, 8, generator=g)
    members = list(range(0, training, 5))
    nonmembers = torch.rand(len(members), 1, 8, 8, generator=g)
    run = lambda: candidate_distances(candidates, images, [1] * training, members, e, nonmembers)  # noqa: E731
    flat = candidates.flatten(1).to(floor_dtype)
    others = [other.flatten(1).to(floor_dtype) for other in (images, nonmembers, candidates)]
    # The same pairs as plain distances: to every training image (the members are among them),
    # to the non-members, and among the candidates.
    floor = lambda: [torch.cdist(flat, other) for other in others]  # noqa: E731
    seconds, ratio = paired(run, floor, repeats * 4)
    return f"extraction matching, {e.candidates} x {training} images, vs {str(floor_dtype)[6:]} cdist", ratio, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="standard", help="a profile name under configs/ or a TOML path")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = config_path(args.config)
    config = check_plugins(load_config(path))  # "all" MIAs: every registered one
    members = config.testbed.members_per_domain
    training = len(config.testbed.private_domains) * members * 4  # about the testbed's distinct training images
    rate = matmul_rate(args.repeats)
    print(f"profile {path.name}, torch threads {torch.get_num_threads()}, fp32 matmul {rate / 1e9:.1f} GFLOP/s")
    rows = [(*training_ratio(config, rate, args.repeats), ">= 0.5", lambda r: r >= 0.5)]
    for name in config.attack.mia:
        rows.append((*mia_ratio(config, name, members, args.repeats), "<= 1.15", lambda r: r <= 1.15))
    rows.append((*sampling_ratio(config, args.repeats), "<= 1.05", lambda r: r <= 1.05))
    # Matching computes in float64 (near-identical images must not cancel to noise), so its floor
    # is float64 cdist; the float32 ratio after the table shows what that precision costs.
    rows.append((*matching_ratio(config, training, args.repeats, torch.float64), "<= 1.15", lambda r: r <= 1.15))
    print(f"{'measure':72s} {'seconds':>8s} {'ratio':>6s}  goal")
    for label, ratio, seconds, goal, meets in rows:
        print(f"{label:72s} {seconds:8.2g} {ratio:6.2f}  {goal} {'met' if meets(ratio) else 'NOT met'}")
    label, ratio, seconds = matching_ratio(config, training, args.repeats, torch.float32)
    print(f"{label:72s} {seconds:8.2g} {ratio:6.2f}  (no goal: the price of float64)")


if __name__ == "__main__":
    main()

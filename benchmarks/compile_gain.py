"""Does torch.compile pay on this CPU? Eager against compiled, in one run (issue 16 item 3).

    .venv/bin/python benchmarks/compile_gain.py [--config standard] [--threads N] [--repeats 8]

The testbed UNet at the profile's shape, timed two ways, eager and after ``torch.compile``
(inductor, the default backend; it needs a C++ compiler):

- one training step (forward and backward of the denoising loss) at the pre-training batch;
- one sampler forward at the sampler's batch (conditional and unconditional rows: 2 x
  ``[extraction] candidates``), without gradients.

Printed per workload: the compile time (the first call), the median seconds eager and compiled,
the speed-up, the calls it takes to earn the compile time back, and the largest difference
between the two outputs (compiled kernels fuse and reorder float32 arithmetic, so the toolkit's
published numbers would move if it compiled). Weights do not change any of these costs, so the
model is a freshly initialised one.
"""

from __future__ import annotations

import argparse
import time

import torch
from ratios import CAPTION, median_seconds  # the sibling benchmark's timer (warm-up, then the median)

from s2l_guard.cli import config_path
from s2l_guard.config import load_config
from s2l_guard.model import build_testbed_bundle


def compare(label: str, eager, compiled, repeats: int) -> None:
    """Times ``eager()`` and ``compiled()`` (each returns the output to compare) and prints one line."""
    reference = eager()  # warm-up
    start = time.perf_counter()
    output = compiled()
    compile_seconds = time.perf_counter() - start
    compiled()  # a second call can still specialise (e.g. on a changed requires_grad)
    plain, fast = median_seconds(eager, repeats), median_seconds(compiled, repeats)
    gain = plain / fast
    break_even = f"{compile_seconds / (plain - fast):.0f}" if plain > fast else "never"
    difference = (output - reference).abs().max().item()
    print(f"{label:44s} {compile_seconds:9.1f} {plain:8.3f} {fast:9.3f} {gain:6.2f}x {break_even:>11s} {difference:11.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="standard", help="a profile name under configs/ or a TOML path")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(config_path(args.config))
    bundle = build_testbed_bundle(config.model, seed=0)
    unet = bundle.unet
    fast = torch.compile(unet)
    g = torch.Generator().manual_seed(0)
    print(f"profile {args.config}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'workload':44s} {'compile s':>9s} {'eager s':>8s} {'compiled':>9s} {'gain':>7s} {'break-even':>11s} {'max |diff|':>11s}")

    batch = config.pretrain.batch_size
    x, t = torch.randn(batch, *bundle.latent_shape, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        context = bundle.encode_prompts([CAPTION] * batch)
    unet.requires_grad_(True)

    def step(model):
        def run():
            unet.zero_grad(set_to_none=True)
            loss = model(x, t, context).sample.pow(2).mean()
            loss.backward()
            return torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])

        return run

    compare(f"training step, batch {batch}", step(unet), step(fast), args.repeats)
    unet.requires_grad_(False)

    rows = 2 * config.extraction.candidates
    x, t = torch.randn(rows, *bundle.latent_shape, generator=g), torch.full((rows,), 500)
    with torch.no_grad():
        context = bundle.encode_prompts([CAPTION] * rows)
        compare(f"sampler forward, batch {rows}", lambda: unet(x, t, context).sample, lambda: fast(x, t, context).sample, args.repeats)


if __name__ == "__main__":
    main()

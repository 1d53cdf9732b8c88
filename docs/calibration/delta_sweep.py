"""Extraction against its null at several radii: which delta separates memorization from chance?

    .venv/bin/python docs/calibration/delta_sweep.py docs/calibration/regime-constant.toml [--deltas 0.05 0.06 ...]

For the config's pre-trained model (built or reused from the cache) and each private domain,
the table's extraction candidates (same count, sampler and seed as the pre-trained row of
`s2l-guard attack`) are matched against the domain's members and its held-out non-members at
each radius. Printed per radius, summed over domains: distinct members matched, distinct
non-members matched (the null) and the excess. A delta is informative where members are
matched well above the null; it is clean where the null is near zero.
"""

from __future__ import annotations

import argparse

import torch

from s2l_guard.config import load_config
from s2l_guard.metrics import tiled_l2
from s2l_guard.runner.cells import S2LRun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.11, 0.12])
    args = parser.parse_args()
    run = S2LRun(load_config(args.config))
    e = run.config.extraction
    totals = {d: [0, 0] for d in args.deltas}
    for domain in run.domains:
        generated = run.provider.generate([domain.prompt] * e.candidates, steps=e.sampler_steps, guidance_scale=e.guidance_scale,
                                          seed=run.measure_seed(domain), batch_size=e.batch_size)  # fmt: skip
        to_members = tiled_l2(generated.images, domain.members.images).min(0).values  # each member's nearest candidate
        to_nonmembers = tiled_l2(generated.images, domain.nonmembers.images).min(0).values
        for d in args.deltas:
            totals[d][0] += int((to_members <= d).sum())
            totals[d][1] += int((to_nonmembers <= d).sum())
    members = sum(len(d.members) for d in run.domains)
    nonmembers = sum(len(d.nonmembers) for d in run.domains)
    print(f"{args.config}: {e.candidates} candidates per domain, {members} members, {nonmembers} held-out non-members")
    print(f"{'delta':>6} {'members matched':>16} {'non-members matched':>20} {'excess':>7}")
    for d, (m, n) in totals.items():
        print(f"{d:6.2f} {m:16d} {n:20d} {m - n * members / nonmembers:+7.1f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

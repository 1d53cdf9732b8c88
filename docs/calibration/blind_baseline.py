"""The blind baseline on the testbed: do its members and non-members differ without the model?

    OMP_NUM_THREADS=1 .venv/bin/python docs/calibration/blind_baseline.py [--config configs/standard.toml] [--relabelings 60]

Builds the config's testbed data set (as `s2l-guard pretrain` writes it) and prints, as Markdown,
the blind AUC with its 95% interval (`s2l_guard.blind.blind_baseline`, defaults: 5 folds, 1000
resamples, seed 0, margin 0.05) per private domain and pooled, for the i.i.d. split and for six
shifted ones, each replacing the held-out non-members: blurred (3x3 binomial kernel), thickened
(3x3 max-pool: strokes dilated by one pixel), another source (a public digit's images: digit d-5,
the first `nonmembers_per_domain` in file order), shifted one pixel right, and dimmed to 90% and 97% contrast.
Shifted images are re-quantised to the PNGs' 1/255 steps. Then the false-alarm rate: the rule on
`--relabelings` random member/non-member relabelings of each private domain's images (i.i.d. by
construction), the baseline's own seed varied with the draw.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from s2l_guard.blind import blind_baseline
from s2l_guard.config import load_config
from s2l_guard.data import load_imagefolder
from s2l_guard.testbed import build_testbed, domain_name


def quantised(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.clamp(0, 1) * 255) / 255


def blurred(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype)
    kernel = (k[:, None] * k[None, :]).expand(x.shape[1], 1, 3, 3)
    return quantised(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1]))


def thickened(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def shifted(x: torch.Tensor) -> torch.Tensor:
    return torch.roll(x, 1, dims=3)


def dimmed(x: torch.Tensor, factor: float) -> torch.Tensor:
    return quantised(factor * x)


def cell(result) -> str:
    return f"{result.auc:.3f} [{result.ci95[0]:.3f}, {result.ci95[1]:.3f}]{' fires' if result.fires else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/standard.toml")
    parser.add_argument("--relabelings", type=int, default=60, help="random relabelings per private domain for the false-alarm rate")
    args = parser.parse_args()
    config = load_config(args.config)
    t = config.testbed
    data = load_imagefolder(build_testbed(tempfile.mkdtemp(), t, config.run.seed))
    members = {d: data.select(membership="member", domain=domain_name(d)).images for d in t.private_domains}
    nonmembers = {d: data.select(membership="nonmember", domain=domain_name(d)).images for d in t.private_domains}
    others = {}
    for d in t.private_domains:
        source = t.public_domains[(d - 5) % len(t.public_domains)] if t.public_domains else None
        others[d] = data.select(membership="public", domain=domain_name(source)).images[: t.nonmembers_per_domain] if source is not None else None
    splits = {
        "i.i.d. (the testbed's held-out non-members)": lambda d: nonmembers[d],
        "blurred (3x3 binomial kernel)": lambda d: blurred(nonmembers[d]),
        "thickened (3x3 max-pool)": lambda d: thickened(nonmembers[d]),
        "another source (public digit d-5)": lambda d: others[d],
        "shifted 1 pixel right": lambda d: shifted(nonmembers[d]),
        "contrast x0.9": lambda d: dimmed(nonmembers[d], 0.9),
        "contrast x0.97": lambda d: dimmed(nonmembers[d], 0.97),
    }
    n_m, n_n = t.members_per_domain, t.nonmembers_per_domain
    k = len(t.private_domains)
    print(f"testbed of {args.config}: seed {config.run.seed}, {n_m} members vs {n_n} non-members per domain, pooled {k * n_m} vs {k * n_n}\n")
    print("| non-members | " + " | ".join(domain_name(d) for d in t.private_domains) + " | pooled |")
    print("|---" * (k + 2) + "|")
    for label, make in splits.items():
        if make(t.private_domains[0]) is None:
            continue
        per = [blind_baseline(members[d], make(d)) for d in t.private_domains]
        pooled = blind_baseline(torch.cat([members[d] for d in t.private_domains]), torch.cat([make(d) for d in t.private_domains]))
        print(f"| {label} | " + " | ".join(cell(r) for r in per) + f" | {cell(pooled)} |")
    if args.relabelings:
        rng = np.random.default_rng(config.run.seed)
        lows, aucs = [], []
        for d in t.private_domains:
            pool = torch.cat([members[d], nonmembers[d]])
            for draw in range(args.relabelings):
                order = rng.permutation(len(pool))
                result = blind_baseline(pool[order[:n_m]], pool[order[n_m:]], seed=draw)
                lows.append(result.ci95[0])
                aucs.append(result.auc)
        lows = np.array(lows)
        print(f"\nfalse alarms on {len(lows)} random relabelings ({n_m} vs {n_n}, i.i.d. by construction): AUC {np.mean(aucs):.3f} +- {np.std(aucs):.3f} (mean +- sd); "
              f"{int((lows > 0.55).sum())} fire at margin 0.05 ({(lows > 0.55).mean():.1%}), "
              f"{int((lows > 0.5).sum())} would at margin 0 ({(lows > 0.5).mean():.1%})")  # fmt: skip


if __name__ == "__main__":
    main()

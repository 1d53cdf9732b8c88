"""Can a faster sampler replace DDIM-50 for extraction candidates without changing what they extract?

    .venv/bin/python docs/calibration/solver_check.py [configs/standard.toml] [--steps 10 15 20 25]

Sampling is 60% of a standard cell (docs/performance.md), all of it UNet forwards, so only
fewer forwards make a cell much faster. For the config's pre-trained model and each private
domain, the pre-trained row's extraction candidates (same count, guidance, seed and so the same
starting noise) are drawn with DDIM at the profile's steps, as `s2l-guard attack` draws them,
and with diffusers' DPMSolverMultistepScheduler (DPM-Solver++, 2nd order) at fewer steps.

Decision rule, fixed before the run (docs/calibration/README.md, issue 16): DPM-Solver++ at k
steps may replace DDIM for candidates only if, in every private domain,
  (a) the distinct members and the distinct held-out non-members within delta of a candidate
      are the same number as DDIM's,
  (b) at least 90% of candidates have the same nearest training image as DDIM's candidate from
      the same noise, and
  (c) the median distance between the paired candidates is below delta / 2.
The smallest k that meets all three is the candidate; if none does, DDIM stays.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler

from s2l_guard.config import load_config
from s2l_guard.metrics import nearest, tiled_l2
from s2l_guard.runner.cells import S2LRun
from s2l_guard.sampling import sample

ROOT = Path(__file__).resolve().parents[2]


@torch.no_grad()
def dpm_sample(bundle, prompts: list[str], *, steps: int, guidance_scale: float, seed: int) -> torch.Tensor:
    """The toolkit's sampler (s2l_guard/sampling.py) with DPM-Solver++ in place of DDIM: same starting noise and guidance."""
    scheduler = DPMSolverMultistepScheduler.from_config(bundle.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(steps)
    x = torch.randn((len(prompts),) + bundle.latent_shape, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    unique = sorted(set(prompts))
    context = bundle.encode_prompts(unique)[torch.tensor([unique.index(p) for p in prompts])]
    context = torch.cat([bundle.encode_prompts([""]).expand(len(prompts), -1, -1), context])
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = bundle.unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, context).sample.chunk(2)
        x = scheduler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, x).prev_sample
    return bundle.to_images(x).cpu()


def extraction_view(candidates: torch.Tensor, domain, training: torch.Tensor, delta: float) -> dict:
    return {
        "members": int((tiled_l2(candidates, domain.members.images).min(0).values <= delta).sum()),
        "nonmembers": int((tiled_l2(candidates, domain.nonmembers.images).min(0).values <= delta).sum()),
        "nearest": nearest(candidates, training)[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "standard.toml"))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25])
    args = parser.parse_args()
    run = S2LRun(load_config(args.config))
    e = run.config.extraction
    bundle = run.deployed
    print(f"{args.config}: {e.candidates} candidates per domain, guidance {e.guidance_scale}, delta {e.delta}; DDIM {e.sampler_steps} "
          "vs DPM-Solver++ (2nd order)")  # fmt: skip
    print(f"{'domain':8} {'sampler':10} {'members':>8} {'null':>5} {'same nearest':>13} {'median paired dist':>19}")
    passes = {k: True for k in args.steps}
    for domain in run.domains:
        prompts = [domain.prompt] * e.candidates
        seed = run.measure_seed(domain)
        ddim = sample(bundle, prompts, steps=e.sampler_steps, guidance_scale=e.guidance_scale, seed=seed, batch_size=e.batch_size)
        ref = extraction_view(ddim, domain, run.training.images, e.delta)
        print(f"{domain.name:8} {'DDIM ' + str(e.sampler_steps):10} {ref['members']:8d} {ref['nonmembers']:5d}")
        for k in args.steps:
            dpm = dpm_sample(bundle, prompts, steps=k, guidance_scale=e.guidance_scale, seed=seed)
            view = extraction_view(dpm, domain, run.training.images, e.delta)
            same = float((view["nearest"] == ref["nearest"]).float().mean())
            paired = float(torch.stack([tiled_l2(dpm[i : i + 1], ddim[i : i + 1])[0, 0] for i in range(len(dpm))]).median())
            ok = view["members"] == ref["members"] and view["nonmembers"] == ref["nonmembers"] and same >= 0.9 and paired < e.delta / 2
            passes[k] &= ok
            print(
                f"{'':8} {'DPM++ ' + str(k):10} {view['members']:8d} {view['nonmembers']:5d} {same:13.2f} {paired:19.4f}  {'meets' if ok else 'fails'}"
            )
    chosen = next((k for k in sorted(passes) if passes[k]), None)
    print(f"decision: {'DPM-Solver++ at ' + str(chosen) + ' steps meets the rule in every domain' if chosen else 'no k meets the rule; DDIM stays'}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

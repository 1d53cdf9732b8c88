"""Can a faster sampler replace DDIM-50 for extraction candidates without changing what they extract?

    .venv/bin/python docs/calibration/solver_check.py [configs/standard.toml] [--steps 10 15 20 25]
        [--rows pretrained lora end2end end2end-members]

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

Second run (2026-12-03): the same rule, now required of every row in ``--rows`` as well as
every domain - the pre-trained model, models shaken on their SP set (LoRA, End-to-End: the
table's rows, trained as ``s2l-guard attack`` trains them, same settings and seed) and the
oracle row (End-to-End on the domain's members), the one model that extracts members, so
criterion (a) is tested where the counts are not near zero. A row's candidates are drawn with
the prompt its cell attacks. SP sets stay DDIM's: this checks the candidates only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler

from attacks.base import SHAKERS
from s2l_guard.config import load_config
from s2l_guard.metrics import nearest, tiled_l2
from s2l_guard.provider import FinetuneRequest
from s2l_guard.runner.cells import S2LRun, _as_fields
from s2l_guard.runner.plan import DataKind, Row, derive_seed, row_label
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


def row_of(label: str) -> Row:
    """A row label of the table (``pretrained``, ``lora``, ``end2end-members``) as its Row."""
    if label == "pretrained":
        return Row("pretrained", None, DataKind.NONE)
    shaker, _, data = label.partition("-")
    kind = DataKind.MEMBERS if data == "members" else DataKind.SP
    return Row(row_label(shaker, kind), shaker, kind)


def attacked_model(run: S2LRun, domain, row: Row):
    """The model and prompt a row's cell attacks: the deployed model, or a fine-tuned copy
    trained as the cell trains it (same data, settings and seed)."""
    if row.shaker is None:
        return run.deployed, domain.prompt
    sp = run.generated_data(domain, row)
    spec = run.cell_spec(domain, row, sp.key if sp else None)["shaker"]
    cls = SHAKERS.get(row.shaker)
    shaker = cls(cls.Settings(**_as_fields(cls.Settings, spec["settings"])))
    data = run._finetune_data(domain, row, sp)
    with torch.enable_grad():  # main() turns gradients off for sampling
        outcome = run.provider.finetune(FinetuneRequest(shaker, data, derive_seed(run.config.run.seed, domain.name, row.label)))
    return outcome.provider.weights(), outcome.prompt if row.data in (DataKind.SP, DataKind.MEMBERS) else domain.prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "standard.toml"))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25])
    parser.add_argument("--rows", nargs="+", default=["pretrained"], help="table rows: pretrained, lora, end2end, end2end-members, ...")
    args = parser.parse_args()
    run = S2LRun(load_config(args.config))
    e = run.config.extraction
    print(f"{args.config}: {e.candidates} candidates per domain, guidance {e.guidance_scale}, delta {e.delta}; DDIM {e.sampler_steps} "
          "vs DPM-Solver++ (2nd order)")  # fmt: skip
    print(f"{'domain':8} {'row':16} {'sampler':10} {'members':>8} {'null':>5} {'same nearest':>13} {'median paired dist':>19}")
    passes = {k: True for k in args.steps}
    for domain, label in ((d, r) for d in run.domains for r in args.rows):
        bundle, prompt = attacked_model(run, domain, row_of(label))
        prompts = [prompt] * e.candidates
        seed = run.measure_seed(domain)
        ddim = sample(bundle, prompts, steps=e.sampler_steps, guidance_scale=e.guidance_scale, seed=seed, batch_size=e.batch_size)
        ref = extraction_view(ddim, domain, run.training.images, e.delta)
        print(f"{domain.name:8} {label:16} {'DDIM ' + str(e.sampler_steps):10} {ref['members']:8d} {ref['nonmembers']:5d}", flush=True)
        for k in args.steps:
            dpm = dpm_sample(bundle, prompts, steps=k, guidance_scale=e.guidance_scale, seed=seed)
            view = extraction_view(dpm, domain, run.training.images, e.delta)
            same = float((view["nearest"] == ref["nearest"]).float().mean())
            paired = float(torch.stack([tiled_l2(dpm[i : i + 1], ddim[i : i + 1])[0, 0] for i in range(len(dpm))]).median())
            ok = view["members"] == ref["members"] and view["nonmembers"] == ref["nonmembers"] and same >= 0.9 and paired < e.delta / 2
            passes[k] &= ok
            print(
                f"{'':8} {'':16} {'DPM++ ' + str(k):10} {view['members']:8d} {view['nonmembers']:5d} {same:13.2f} {paired:19.4f}  {'meets' if ok else 'fails'}",
                flush=True,
            )
    chosen = next((k for k in sorted(passes) if passes[k]), None)
    print(
        f"decision: {'DPM-Solver++ at ' + str(chosen) + ' steps meets the rule in every domain and row' if chosen else 'no k meets the rule; DDIM stays'}"
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

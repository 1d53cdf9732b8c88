"""The GPU path, timed: the S2L table and a Stable-Diffusion-shaped latent cell, in bf16 autocast.

    bash benchmarks/gpu.sh                                             # on a CUDA machine
    .venv/bin/python benchmarks/gpu.py --size smoke --device cpu       # the same, at smoke size (tests)

1. The table: a profile's whole S2L table (``standard`` at full size, ``smoke`` at smoke size):
   pre-training and its memorization report, then every cell (one process: [run] workers is 1
   on a GPU).
2. The latent cell: a model with Stable Diffusion v1's VAE and UNet built from diffusers
   classes (full size: 512x512 images, 64x64x4 latents, an 860M-parameter UNet; smoke size:
   the tests' tiny latent model), saved as a diffusers folder and audited on the testbed's
   digits enlarged to its resolution: one domain's pre-trained row and its LoRA-on-SP-set row
   (SP generation, fine-tuning, each MIA, candidates, matching) - what a real checkpoint costs.

Everything runs under ``torch.autocast(dtype=bfloat16)`` (``--dtype float32`` turns it off) in
a throwaway store, so nothing computed in bf16 reaches the project's cache. Prints seconds per
stage and peak memory (the GPU's allocator peak on CUDA, the process's peak RSS on CPU).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_cell import StageTimer, wrap_cell_stages  # noqa: E402

from s2l_guard.cli import config_path  # noqa: E402
from s2l_guard.config import Config, load_config  # noqa: E402
from s2l_guard.data import Record, load_imagefolder, write_imagefolder  # noqa: E402

PROFILE = {"full": "standard", "smoke": "smoke"}
IMAGE_SIZE = {"full": 512, "smoke": 16}  # the latent model's resolution


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on the GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (CPU)"


def enlarged_digits(config: Config, folder: Path, size: int) -> Path:
    """The testbed's data set with every digit enlarged to ``size`` x ``size`` RGB (same records)."""
    from s2l_guard.cache import Store
    from s2l_guard.runner.stages import testbed_stage

    digits = load_imagefolder(testbed_stage(Store(config.run.store), config).path)
    grey = (digits.images[:, 0].numpy() * 255).round().astype(np.uint8)
    rgb = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC).convert("RGB")) for g in grey])
    return write_imagefolder(folder, rgb, [Record(**vars(r)) for r in digits.records])


def latent_model(size: str, folder: Path) -> Path:
    """SD v1's sizes, or the tests' tiny latent model with the profiles' 1000-step noise schedule."""
    from s2l_guard.testing import save_sd_v1_folder, sd_v1_sized_bundle, tiny_latent_bundle

    if size == "full":
        return save_sd_v1_folder(folder, bundle=sd_v1_sized_bundle())
    tiny = tiny_latent_bundle()
    return save_sd_v1_folder(folder, bundle=replace(tiny, scheduler=DDPMScheduler.from_config(tiny.scheduler.config, num_train_timesteps=1000)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("full", "smoke"), default="full", help="full: the standard table and SD v1's sizes")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="autocast dtype (float32: none)")
    parser.add_argument("--stages", nargs="+", default=["table", "latent"], choices=("table", "latent"))
    args = parser.parse_args()

    from s2l_guard.runner.cells import S2LRun
    from s2l_guard.runner.plan import plan_rows
    from s2l_guard.runner.stages import run_pretrain
    from s2l_guard.runner.table import run_attack
    from s2l_guard.runtime import resolve_device

    device = resolve_device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    seconds: dict[str, float] = {}
    peaks: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="s2l-gpu-") as tmp, autocast:
        base = load_config(config_path(PROFILE[args.size])).replace(
            run={"store": f"{tmp}/store", "out_dir": f"{tmp}/runs", "device": device.type, "workers": 1}
        )  # one process: autocast does not reach worker processes
        if "table" in args.stages:
            start = time.perf_counter()
            run_pretrain(base)
            seconds["table: pre-training and memorization report"] = time.perf_counter() - start
            start = time.perf_counter()
            results = run_attack(base)
            seconds[f"table: {sum(len(d['rows']) for d in results['domains'].values())} cells and utility"] = time.perf_counter() - start
            peaks["table"] = peak_memory(device)
        if "latent" in args.stages:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            model = latent_model(args.size, Path(tmp) / "sd")
            data = enlarged_digits(base, Path(tmp) / "data", IMAGE_SIZE[args.size])
            seconds["latent: build and save the model, enlarge the data"] = time.perf_counter() - start
            config = base.replace(
                run={"model": str(model), "data": str(data), "store": f"{tmp}/latent-store"},
                attack={"domains": [f"digit{base.testbed.private_domains[0]}"]},
            )
            timer = StageTimer()
            wrap_cell_stages(timer)
            with timer.stage("latent: loading the model and data"):
                run = S2LRun(config)
            rows = {row.label: row for row in plan_rows(run.config)}
            for label in ("pretrained", "lora"):
                with timer.stage(f"latent: rest of the {label} cell"):
                    run.run_cell(run.domains[0], rows[label])
            seconds |= {name if name.startswith("latent") else f"latent: {name}": s for name, s in timer.seconds.items()}
            peaks["latent cell"] = peak_memory(device)

        probe = (torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)).dtype  # what autocast made of a matmul
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), size {args.size}, "
          f"autocast {args.dtype} (a matmul's result inside it: {probe}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")  # fmt: skip
    print(f"{'stage':56s} {'seconds':>9s}")
    for name, s in seconds.items():
        print(f"{name:56s} {s:9.1f}")
    for stage, peak in peaks.items():
        print(f"peak memory after the {stage}: {peak}")


if __name__ == "__main__":
    main()

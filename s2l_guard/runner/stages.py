"""Stages that turn a config into cached artifacts: testbed -> pre-trained bundle -> memorization report.

Each stage's cache key holds its own config section, the seed and the keys of
the artifacts it consumes, so changing the report settings reuses the trained
model, and changing the testbed retrains it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from defenses.base import PretrainContext
from s2l_guard import __version__
from s2l_guard.cache import Artifact, Store, content_key, folder_key
from s2l_guard.config import Config
from s2l_guard.data import load_imagefolder
from s2l_guard.errors import ConfigError
from s2l_guard.figures import plot_nearest_members
from s2l_guard.memorization import format_report, memorization_report
from s2l_guard.model import build_testbed_bundle, load_bundle
from s2l_guard.runtime import log, resolve_device
from s2l_guard.testbed import build_testbed
from s2l_guard.training import TrainSettings, pretrain_trainable, train


def folder_artifact(kind: str, folder: str) -> Artifact:
    """A folder the user gave ([run] model or data) as an artifact, keyed by its content so
    cached cells follow the files, not the path."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"[run] {kind} = {folder!r} is not a folder; give a diffusers model folder / an imagefolder data set")
    return Artifact(kind, folder_key(path), path, reused=True)


def testbed_stage(store: Store, config: Config) -> Artifact:
    if config.run.data:
        artifact = folder_artifact("data", config.run.data)
        log(f"data set given: {artifact.path}")
        return artifact
    spec = {"testbed": config.section("testbed"), "seed": config.run.seed}
    artifact = store.get_or_build("testbed", spec, lambda folder, key: build_testbed(folder, config.testbed, config.run.seed))
    log(f"testbed {'reused' if artifact.reused else 'built'}: {artifact.path}")
    return artifact


def pretrain_spec(config: Config, data_key: str) -> dict[str, Any]:
    return {"model": config.section("model"), "pretrain": config.section("pretrain"), "seed": config.run.seed, "data": data_key}


def _progress_lines(total: int, start: float, name: str = ""):
    """Without a terminal (logs, CI) tqdm stays silent; print a line every tenth instead."""
    if sys.stderr.isatty():
        return None
    every = max(1, total // 10)

    def report(step: int, loss: float) -> None:
        if step % every == 0:
            log(f"{name + ' ' if name else ''}step {step}/{total}, loss {loss:.4f}, {time.perf_counter() - start:.0f} s")

    return report


def pretrain_settings(config: Config) -> TrainSettings:
    p = config.pretrain
    return TrainSettings(p.steps, p.batch_size, p.caption_dropout, p.grad_clip, config.run.seed, p.checkpoint_every,
                         lr_schedule=p.lr_schedule, warmup_steps=p.warmup_steps, ema_decay=p.ema_decay)  # fmt: skip


def fresh_bundle(config: Config, dataset, device: torch.device):
    """The untrained testbed model [model] describes, shaped for ``dataset``'s images."""
    shape = dataset.images.shape
    return build_testbed_bundle(config.model, image_size=shape[-1], channels=shape[1], seed=config.run.seed).to(device)


def standard_pretrain(config: Config, dataset, device: torch.device, images, captions, checkpoint_dir: Path):
    """The undefended recipe: AdamW on the UNet (and text encoder if configured). Returns (bundle, summary)."""
    bundle = fresh_bundle(config, dataset, device)
    p = config.pretrain
    trainable = pretrain_trainable(bundle, config)
    optimizer = torch.optim.AdamW(trainable.values(), lr=p.learning_rate, weight_decay=p.weight_decay)
    log(f"pre-training {sum(bundle.num_parameters().values()):,} parameters on {len(images)} images "
        f"({len(set(captions))} captions) for {p.steps} steps at batch {p.batch_size} on {device}")  # fmt: skip
    start = time.perf_counter()
    result = train(bundle, images, captions, trainable=trainable, optimizer=optimizer, settings=pretrain_settings(config),
                   checkpoint_dir=checkpoint_dir, description="pretrain", on_step=_progress_lines(p.steps, start))  # fmt: skip
    if result.resumed_from:
        log(f"resumed from the checkpoint at step {result.resumed_from}")
    if p.release == "ema":  # SD v1's standard checkpoints hold only the EMA weights
        result.ema.copy_to(trainable.values())
    losses = result.losses
    summary = {
        "parameters": bundle.num_parameters(),
        "trainable_parameters": sum(q.numel() for q in trainable.values()),
        "training_images": len(images),
        "steps": p.steps,
        "lr_schedule": p.lr_schedule,
        "warmup_steps": p.warmup_steps,
        "ema_decay": p.ema_decay,
        "ema_final_decay": result.ema.cur_decay_value if result.ema is not None else None,
        "release": p.release,
        "resumed_from": result.resumed_from,
        "loss_first_50": sum(losses[:50]) / max(1, len(losses[:50])),
        "loss_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
    }
    return bundle, summary


def stored_standard_pretrain(store: Store, config: Config, dataset, device: torch.device, images, captions):
    """:func:`standard_pretrain` on some rows, kept in the store under a key of those rows: a defense
    that pre-trains on part of the data (private_finetune's public domains) trains that part once
    for every epsilon of a sweep and every audit, not once each."""
    rows = hashlib.sha256(images.cpu().numpy().tobytes() + "\n".join(captions).encode()).hexdigest()[:24]

    def build(folder: Path, key: str) -> None:
        bundle, summary = standard_pretrain(config, dataset, device, images, captions, store.workdir("bundle", key))
        bundle.save(folder)
        (folder / "training.json").write_text(json.dumps(summary, indent=2))

    artifact = store.get_or_build("bundle", pretrain_spec(config, f"rows-{rows}"), build)
    log(f"standard pre-training of {len(images)} rows {'reused' if artifact.reused else 'saved'}: {artifact.path}")
    return load_bundle(artifact.path, device=device), json.loads((artifact.path / "training.json").read_text())


def defense_context(config: Config, dataset, device: torch.device, workdir: Path, undefended=None, store: Store | None = None) -> PretrainContext:
    """What a training-recipe defense trains from: ``dataset``, the standard recipe on it (kept in
    ``store`` when one is given), progress lines."""
    if store is not None:
        standard = lambda images, captions: stored_standard_pretrain(store, config, dataset, device, images, captions)  # noqa: E731
    else:
        standard = lambda images, captions: standard_pretrain(config, dataset, device, images, captions, workdir)  # noqa: E731
    return PretrainContext(dataset, config, device, workdir, standard, lambda: fresh_bundle(config, dataset, device), pretrain_settings(config),
                           lambda total, name: _progress_lines(total, time.perf_counter(), name), undefended)  # fmt: skip


def pretrain_stage(store: Store, config: Config, data: Artifact, device: torch.device, defense=None) -> Artifact:
    """The provider's model: the standard recipe, or the one a training-recipe defense replaces it with."""
    defended = defense is not None and "training" in defense.points
    if config.run.model:
        if defended:
            raise ConfigError(f"defense {defense.name} is a pre-training recipe and cannot be applied to the given model "
                              f"([run] model); gate it on the testbed, or use none / an API defense")  # fmt: skip
        artifact = folder_artifact("model", config.run.model)
        log(f"model given: {artifact.path}")
        return artifact

    def build(folder: Path, key: str) -> None:
        start = time.perf_counter()
        dataset = load_imagefolder(data.path)
        workdir = store.workdir("bundle", key)
        if defended:
            log(f"pre-training under the {defense.name} defense")

            def undefended():
                base = pretrain_stage(store, config, data, device)
                return load_bundle(base.path, device=device), json.loads((base.path / "training.json").read_text())

            bundle, summary = defense.pretrain(defense_context(config, dataset, device, workdir, undefended, store))
            summary["defense"] = defense.spec()
        else:
            bundle, summary = standard_pretrain(config, dataset, device, *dataset.training_set(), workdir)
        bundle.save(folder)
        # The CPU kernels' instruction set (AVX2, AVX512, ...) changes float rounding: the weights,
        # and the last printed digit of some numbers, differ between them (docs/standard-table.md).
        isa = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None
        summary.update(
            wall_seconds_this_process=round(time.perf_counter() - start, 2), device=str(device), torch=torch.__version__, cpu_capability=isa
        )
        (folder / "training.json").write_text(json.dumps(summary, indent=2))

    spec = pretrain_spec(config, data.key)
    if defended:
        spec["defense"] = defense.spec()
    artifact = store.get_or_build("bundle", spec, build)
    log(f"pre-trained bundle {'reused' if artifact.reused else 'saved'}: {artifact.path}")
    return artifact


def memorization_stage(store: Store, config: Config, data: Artifact, bundle_art: Artifact, device: torch.device) -> Artifact:
    def build(folder: Path, key: str) -> None:
        dataset = load_imagefolder(data.path)
        bundle = load_bundle(bundle_art.path, device=device)
        log("measuring memorization (denoising loss and generations per private domain)")
        report, examples = memorization_report(bundle, dataset, config.report, seed=config.run.seed)
        (folder / "memorization.json").write_text(json.dumps(report, indent=2))
        plot_nearest_members(examples, folder / "samples.png", delta=config.report.extraction_delta)

    spec = {"report": config.section("report"), "seed": config.run.seed, "bundle": bundle_art.key, "data": data.key}
    artifact = store.get_or_build("memorization", spec, build)
    log(f"memorization report {'reused' if artifact.reused else 'computed'}: {artifact.path}")
    return artifact


def run_folder(config: Config) -> Path:
    """``runs/<profile>-<hash of the resolved config>/``: one folder per experiment, reused by reruns."""
    folder = Path(config.run.out_dir) / f"{config.name}-{content_key('run', config.measured_dict())[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class PretrainOutputs:
    run_dir: Path
    data: Artifact
    bundle: Artifact
    report: dict[str, Any]


def run_pretrain(config: Config) -> PretrainOutputs:
    """Build the testbed, pre-train on it, report memorization; write a run folder."""
    start = time.perf_counter()
    device = resolve_device(config.run.device)
    store = Store(config.run.store)
    data = testbed_stage(store, config)
    bundle_art = pretrain_stage(store, config, data, device)
    memo = memorization_stage(store, config, data, bundle_art, device)
    report = json.loads((memo.path / "memorization.json").read_text())
    training = json.loads((bundle_art.path / "training.json").read_text())

    run_dir = run_folder(config)
    table = format_report(report)
    results = {
        "s2l_guard_version": __version__,
        "config_source": config.source,
        "config": config.to_dict(),
        "artifacts": {"testbed": str(data.path), "bundle": str(bundle_art.path), "memorization": str(memo.path)},
        "pretraining": training,
        "memorization": report,
        "python": platform.python_version(),
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    (run_dir / "config.toml").write_text(config.to_toml())
    (run_dir / "pretrain.json").write_text(json.dumps(results, indent=2))
    (run_dir / "memorization.txt").write_text(config.to_toml() + "\n" + table + "\n")
    (run_dir / "samples.png").write_bytes((memo.path / "samples.png").read_bytes())
    print(table)
    log(f"outputs in {run_dir}/ (pretrain.json, memorization.txt, samples.png, config.toml); "
        f"model in {bundle_art.path}; took {results['wall_seconds']:.1f} s")  # fmt: skip
    return PretrainOutputs(run_dir, data, bundle_art, report)

"""Deploying a defense and running its table's cells: each (domain, row) measured once and cached.

Every (domain, row) is cached in the artifact store under the hash of everything
that determines it, so a rerun is instant and a killed run resumes at the first
unfinished cell. Cells keep raw per-sample scores; the summaries (`summaries.py`)
are recomputed from them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from attacks.adaptive import adapt_request
from attacks.base import MIA, SHAKERS, FinetuneData
from attacks.s2l import Domain, extraction_at, measure, split_domains
from attacks.sp_set import generate_sp_set
from defenses.base import DEFENSES
from s2l_guard.cache import Artifact, Store, content_key, folder_key
from s2l_guard.config import Config
from s2l_guard.data import load_imagefolder
from s2l_guard.errors import ConfigError, DataError
from s2l_guard.metrics import rate_with_interval, roc_metrics
from s2l_guard.model import Bundle, load_bundle
from s2l_guard.provider import FinetuneRequest, Provider
from s2l_guard.results import Status, TableCell
from s2l_guard.runtime import log, resolve_device
from s2l_guard.utility import model_utility

from .checks import compatibility_problems, sample_warnings
from .plan import DataKind, Row, attack_seed, derive_seed, ood_data, ood_domain, ood_spec, resolve_threat_model
from .settings import check_plugins, defense_settings, mia_settings, shaker_settings
from .stages import pretrain_stage, testbed_stage

CELL_FORMAT = 7  # bump when what a cell stores changes, so cached cells are recomputed


class S2LRun:
    """Runs the cells of one config against the provider its defense deploys.

    Attacks hold ``self.provider`` only; ``self.deployed`` is the auditor's own handle on the
    deployed model, for utility and filter reports, never for an attack.
    """

    def __init__(self, config: Config):
        config = check_plugins(config)
        self.defense = DEFENSES.get(config.defense.name)(defense_settings(config, config.defense.name))
        self.threat_model = resolve_threat_model(config.defense.threat_model, self.defense)
        # Membership inference needs what the threat model gives; the others are left out and listed.
        self.unavailable_mia = [m for m in config.attack.mia if self.threat_model not in MIA.get(m).threat_models]
        if self.unavailable_mia:
            config = config.replace(attack={"mia": [m for m in config.attack.mia if m not in self.unavailable_mia]})
        self.config = config
        self.seed = attack_seed(config)  # every attack-side seed derives from it; pre-training keeps [run] seed
        # The configured attacks the threat model allows, built once for every cell and trajectory step.
        self.mias = {name: MIA.get(name)(mia_settings(config, name)) for name in config.attack.mia}
        self.device = resolve_device(config.run.device)
        self.store = Store(config.run.store)
        self.data_art = testbed_stage(self.store, config)
        self.bundle_art = pretrain_stage(self.store, config, self.data_art, self.device, self.defense)
        self.dataset = load_imagefolder(self.data_art.path)
        self.deployed = load_bundle(self.bundle_art.path, device=self.device)
        self.domains, self.training = split_domains(self.dataset, config.attack.domains)
        problems = compatibility_problems(self.deployed, self.dataset, self.domains, config)
        if problems:  # before the defense's preparation or any cell touches the model
            raise DataError(f"the model at {self.bundle_art.path} does not fit the data at {self.data_art.path}: " + "\n".join(problems))
        for warning in sample_warnings(self.domains, config):
            log(f"note: {warning}")
        self.defense.prepare(self.deployed, self.dataset, config)
        self.provider = Provider(self.deployed, self.threat_model, self.defense)
        log(f"defense {self.defense.name}, threat model {self.threat_model}"
            + (f" (no {', '.join(self.unavailable_mia)}: they need the weights)" if self.unavailable_mia else ""))  # fmt: skip

    @property
    def filters_finetune(self) -> bool:
        """Whether fine-tune requests pass a defense (then adaptive requests are worth running)."""
        return self.provider.behind_api and "finetune" in self.defense.points

    def api_spec(self) -> dict | None:
        """What the provider adds to a cell's key: nothing under open-weights, where the attacker
        works on its own copy of the weights and cells are shared with the undefended run."""
        if not self.provider.behind_api:
            return None
        acts = {"finetune", "generate"} & set(self.defense.points)
        return {"threat_model": self.threat_model, "defense": self.defense.spec() if acts else None}

    def generate_spec(self) -> dict | None:
        """What the provider adds to the key of what is only *generated* (SP sets, utility): a
        defense that does not act on generations serves the undefended model's images, so those
        artifacts are shared with the undefended run (a fine-tune filter's SP sets and utility)."""
        return self.api_spec() if "generate" in self.defense.points else None

    def _sp_spec(self, name: str, prompt: str) -> dict:
        spec = {"bundle": self.bundle_art.key, "domain": name, "prompt": prompt,
                "sp_set": self.config.section("sp_set"), "seed": self.seed}  # fmt: skip
        if (provider := self.generate_spec()) is not None:
            spec["provider"] = provider
        return spec

    def sp_set(self, name: str, prompt: str) -> Artifact:
        """The model's own generations of a domain's prompt (the domain's SP set), cached."""
        seed = derive_seed(self.seed, "sp", name)
        return self.store.get_or_build(
            "sp_set",
            self._sp_spec(name, prompt),
            lambda folder, key: generate_sp_set(folder, self.provider, prompt, name, self.config.sp_set, seed=seed),
        )

    def sp_source(self, domain: Domain, row: Row) -> tuple[str, str] | None:
        """(domain, prompt) of the self-generated images a row trains on: its domain's SP set, or a public domain's."""
        if row.data == DataKind.SP:
            return domain.name, domain.prompt
        if row.data == DataKind.OOD_GEN:
            name = ood_domain(self.dataset)
            return (name, self.dataset.domain_caption(name)) if name else None
        return None

    def generated_data(self, domain: Domain, row: Row) -> Artifact | None:
        source = self.sp_source(domain, row)
        return self.sp_set(*source) if source else None

    def is_cached(self, domain: Domain, row: Row) -> bool:
        """Whether ``run_cell`` would only read the store (nothing is built to find out)."""
        if row.shaker and self.threat_model not in SHAKERS.get(row.shaker).threat_models:
            return True
        source = self.sp_source(domain, row)
        sp_key = content_key("sp_set", self._sp_spec(*source)) if source else None
        return self.store.find("cell", self.cell_spec(domain, row, sp_key)) is not None

    def cell_spec(self, domain: Domain, row: Row, sp_key: str | None) -> dict:
        c = self.config
        shaker = None
        if row.shaker:
            settings = shaker_settings(c, row.shaker)
            if row.overrides:
                settings = type(settings)(**{**settings.__dict__, **dict(row.overrides)})
            shaker = {"name": row.shaker, "settings": json.loads(json.dumps(settings.__dict__, default=list))}
        extra = {}
        if self.api_spec() is not None:
            extra["provider"] = self.api_spec()
        if row.variant:
            extra["variant"] = {"name": row.variant, "adaptive": c.section("adaptive"), "ood_data": ood_spec(self.dataset, c)}
        return extra | {
            "format": CELL_FORMAT, "bundle": self.bundle_art.key, "data": self.data_art.key, "domain": domain.name, "row": row.label,
            "shaker": shaker, "sp_set": sp_key, "seed": self.seed,
            # the real out-of-domain images a row trains on (their number follows [sp_set] images)
            "ood_data": ood_spec(self.dataset, c) if row.data == DataKind.OOD else None,
            "mia": {name: json.loads(json.dumps(mia_settings(c, name).__dict__, default=list)) for name in c.attack.mia},
            # every setting but the counting radius, which is applied when the cell is read
            "extraction": {k: v for k, v in c.section("extraction").items() if k != "delta"},
            # only training rows record a trajectory; the others must not be recomputed when it changes
            "trajectory_every": c.attack.trajectory_every if row.shaker and row.data != DataKind.NONE else 0,
        }  # fmt: skip

    def run_cell(self, domain: Domain, row: Row) -> TableCell:
        if row.shaker and self.threat_model not in SHAKERS.get(row.shaker).threat_models:
            return TableCell(row.label, row.shaker, row.data, Status.NOT_RUN, f"{row.shaker} needs what {self.threat_model} does not give")
        sp = self.generated_data(domain, row)
        spec = self.cell_spec(domain, row, sp.key if sp else None)
        seed = derive_seed(self.seed, domain.name, row.label)  # the row's own training noise

        def build(folder: Path, key: str) -> None:
            start = time.perf_counter()
            cell: dict[str, Any] = {"row": row.label, "shaker": row.shaker, "data": row.data, "sigma": row.sigma, "variant": row.variant}
            if row.shaker is None:
                cell["trainable_parameters"] = 0
                cell.update(
                    measure(self.provider, domain, domain.prompt, self.training, self.mias, self.config.extraction, self.measure_seed(domain))
                )
            else:
                data = self._finetune_data(domain, row, sp)
                if data is None:
                    cell.update(status="not-run", reason="no public domain to use as out-of-domain data")
                else:
                    cell.update(self._shake_and_measure(domain, row, data, seed, spec["shaker"]))
            cell["seconds"] = round(time.perf_counter() - start, 2)
            (folder / "cell.json").write_text(json.dumps(cell))

        artifact = self.store.get_or_build("cell", spec, build)
        cell = json.loads((artifact.path / "cell.json").read_text())
        if "extraction" in cell:
            cell["extraction"] = extraction_at(cell["extraction"], self.config.extraction.delta, self.training.files)
        return TableCell.from_dict(cell | {"cached": artifact.reused})

    def _utility_spec(self) -> dict:
        return {"format": 1, "bundle": self.bundle_art.key, "data": self.data_art.key, "utility": self.config.measured_dict()["utility"],
                "loss": [self.config.report.loss_timesteps, self.config.report.loss_draws], "seed": self.seed,
                "provider": self.generate_spec()} | self._utility_key_parts  # fmt: skip

    @functools.cached_property
    def _utility_key_parts(self) -> dict:
        """A feature model is keyed by its files, not its path (hashed once per run: it may be large)."""
        path = self.config.utility.feature_model
        return {"feature_model": folder_key(Path(path))} if path and Path(path).is_dir() else {}

    def utility_is_cached(self) -> bool:
        return self.store.find("utility", self._utility_spec()) is not None

    def utility(self) -> dict:
        """Utility of the deployed model as users get it (see :func:`s2l_guard.utility.model_utility`), cached."""
        spec = self._utility_spec()

        def build(folder: Path, key: str) -> None:
            start = time.perf_counter()
            log("measuring utility (generations of every domain, held-out denoising loss)")
            result = model_utility(self.provider, self.deployed, self.dataset, self.config, seed=derive_seed(self.seed, "utility"))
            result["seconds"] = round(time.perf_counter() - start, 2)
            (folder / "utility.json").write_text(json.dumps(result, indent=1))

        return json.loads((self.store.get_or_build("utility", spec, build).path / "utility.json").read_text())

    def defense_report(self) -> dict:
        """What the defense did, beyond the table: its pre-training summary (epsilon, images
        removed) and, for a fine-tune filter, its detection and false-rejection rates."""
        summary = self.bundle_art.path / "training.json"  # absent from a model folder the user gave
        training = json.loads(summary.read_text()) if summary.is_file() else {"given": str(self.bundle_art.path)}
        report: dict[str, Any] = {"name": self.defense.name, "points": list(self.defense.points), "threat_model": self.threat_model,
                                  "settings": self.defense.spec()["settings"], "unavailable_mia": self.unavailable_mia,
                                  "pretraining": training}  # fmt: skip
        if hasattr(self.defense, "detection") and self.filters_finetune:  # with the weights the filter is not in the way
            report["filter"] = self.filter_report()
        return report

    def filter_report(self) -> dict:
        """Detection rates of the fine-tune filter on bootstrap sets of each domain's SP set and of
        the adaptive requests built from it, pooled over domains, beside its false-rejection rate
        on held-out benign sets of the same sizes."""
        f, a = self.defense, self.config.adaptive
        counts: dict[str, list[int]] = {}
        sizes: dict[str, int] = {}
        for domain in self.domains:
            sp = self._finetune_data(domain, Row(domain.name, None, DataKind.SP), self.sp_set(domain.name, domain.prompt))
            for variant in ("",) + a.variants:
                seed = derive_seed(self.seed, "adaptive", domain.name, f"report-{variant}")
                data = adapt_request(sp, variant, self.config, ood_data(self.dataset, self.config), seed) if variant else sp
                found = f.detection(f.image_losses(self.deployed, data.images, list(data.captions)), len(data.images))
                hits, n = counts.setdefault(variant or "sp", [0, 0])
                counts[variant or "sp"] = [hits + round(found["rate"] * found["n"]), n + found["n"]]
                sizes[variant or "sp"] = len(data.images)
        return {
            "detection": {k: {"size": sizes[k], **rate_with_interval(h, n)} for k, (h, n) in counts.items()},
            "false_rejection_heldout": {str(size): f.heldout_false_rejection(size) for size in sorted(set(sizes.values()))},
            "method": "per-request statistic: mean denoising loss of the request's images under the deployed model; "
                      f"bootstrap sets (with replacement) of the request's size, {f.settings.calibration_sets} benign calibration "
                      "sets per size; Wilson 95% intervals",
        }  # fmt: skip

    def measure_seed(self, domain: Domain) -> int:
        """One seed per domain for every model's attacks: the loss attack's noise and the
        extraction candidates' starting noise are then the same for the pre-trained and the
        shaken model (common random numbers), so the paired tests compare models, not draws."""
        return derive_seed(self.seed, "measure", domain.name)

    def _finetune_data(self, domain: Domain, row: Row, sp: Artifact | None) -> FinetuneData | None:
        if row.data in (DataKind.SP, DataKind.OOD_GEN):
            if sp is None:
                return None
            images = load_imagefolder(sp.path, channels=self.dataset.images.shape[1])
            captions = [r.text for r in images.records]
            data = FinetuneData(images.images, captions, domain.prompt if row.data == DataKind.SP else captions[0])
            return (
                adapt_request(
                    data,
                    row.variant,
                    self.config,
                    ood_data(self.dataset, self.config),
                    derive_seed(self.seed, "adaptive", domain.name, row.label),
                )
                if row.variant
                else data
            )
        if row.data == DataKind.OOD:
            return ood_data(self.dataset, self.config)
        if row.data == DataKind.MEMBERS:
            return FinetuneData(domain.members.images, [r.text for r in domain.members.records], domain.prompt)
        return FinetuneData(torch.empty(0), [], domain.prompt)  # Gaussian shaking uses no data

    def _shake_and_measure(self, domain: Domain, row: Row, data: FinetuneData, seed: int, shaker_spec: dict) -> dict:
        cls = SHAKERS.get(row.shaker)
        shaker = cls(cls.Settings(**_as_fields(cls.Settings, shaker_spec["settings"])))
        trajectory: list[dict] = []
        primary = self.config.attack.mia[0] if self.config.attack.mia else None
        measure_seed = self.measure_seed(domain)

        # Mid-training the domain is reached through the method's prompt too (TI's token).
        on_domain = row.data in (DataKind.SP, DataKind.MEMBERS)  # trained on the domain's own images, under its prompt
        prompt = shaker.target_prompt(data) if on_domain and hasattr(shaker, "target_prompt") else domain.prompt
        captions = lambda part: [r.text.replace(domain.prompt, prompt) for r in part.records]  # noqa: E731

        def on_step(step: int, bundle: Bundle) -> None:  # open-weights only: the attacker trains locally
            attack = self.mias[primary]
            m = attack.score(bundle, domain.members.images, captions(domain.members), seed=measure_seed)
            n = attack.score(bundle, domain.nonmembers.images, captions(domain.nonmembers), seed=measure_seed)
            trajectory.append({"step": step, "mia": primary, "auc": float(roc_metrics(m, n, resamples=100)["auc"].value)})

        every = self.config.attack.trajectory_every if primary else 0
        request = FinetuneRequest(shaker, data, seed)
        outcome = self.provider.finetune(request, callback=on_step if every else None, callback_every=every)
        if not outcome.admitted:
            return {"status": "refused", "reason": outcome.reason, "evidence": outcome.evidence, "images": len(data.images)}
        # The domain's prompt in the shaken model (Textual Inversion's token for an SP row;
        # the OoD control is attacked with the domain's own prompt).
        prompt = outcome.prompt if on_domain else domain.prompt
        out = measure(outcome.provider, domain, prompt, self.training, self.mias, self.config.extraction, measure_seed)
        out.update(trainable_parameters=outcome.trainable_parameters, trajectory=trajectory, evidence=outcome.evidence,
                   images=len(data.images), final_loss=float(np.mean(outcome.losses[-10:])) if outcome.losses else None)  # fmt: skip
        return out


def _as_fields(cls: type, values: dict) -> dict:
    """JSON lists back to the tuples a frozen Settings dataclass holds."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}


def run_cells(
    run: S2LRun, rows: list[Row], progress: Callable[[TableCell], None] | None = None, *, utility: bool = False
) -> dict[str, dict[str, TableCell]]:
    """Every (domain, row) cell, logged (or passed to ``progress``) as it finishes; a crashing
    cell is recorded as failed. Cells not in the store are spread over worker processes when
    [run] workers allows more than one (see :func:`cell_workers`); ``utility``: the deployed
    model's utility is measured beside them, for ``run.utility()`` to read."""
    order = [(domain, row) for domain in run.domains for row in rows]
    found: dict[tuple[str, str], TableCell] = {}
    for done, (domain, row, cell) in enumerate(_finished_cells(run, order, utility), start=1):
        found[domain.name, row.label] = cell
        if progress is not None:
            progress(cell)
            continue
        took = "cached" if cell.cached else cell.status.value if not cell.ok else f"{cell.seconds:.1f} s"
        log(f"cell {done}/{len(order)}: {domain.name} {row.label} ({took})")
    return {domain.name: {row.label: found[domain.name, row.label] for row in rows} for domain in run.domains}


def cell_workers(config: Config, device: torch.device) -> int:
    """Worker processes for a run's cells: [run] workers, or (0, auto) one per CPU thread torch
    may use - one thread each, since two standard cells on one thread apiece finish 1.4x sooner
    than the two in turn on two threads (docs/performance.md) - and one on a GPU."""
    if config.run.workers:
        return config.run.workers
    return torch.get_num_threads() if device.type == "cpu" else 1


def _finished_cells(run: S2LRun, order: list[tuple[Domain, Row]], utility: bool) -> Iterator[tuple[Domain, Row, TableCell]]:
    """(domain, row, cell) as each cell finishes: the missing ones in worker processes, if more
    than one is allowed and needed, then the rest (read from the store) in this process."""
    missing = [(d, r) for d, r in order if not run.is_cached(d, r)]
    utility = utility and not run.utility_is_cached()
    ray = run.config.run.executor == "ray" and (missing or utility)
    workers = min(cell_workers(run.config, run.device), len(missing) + utility)
    if ray or workers > 1:
        computed = {(d.name, r.label) for d, r in missing}
        _generate_sp_sets(run, missing)
        cheap_last = sorted(missing, key=lambda dr: dr[1].data == DataKind.NONE)  # fine-tunes before the cheap untrained rows
        if ray:
            from .ray_cells import ray_cells

            yield from ray_cells(run, cheap_last, utility)
        else:
            yield from _pooled_cells(run, cheap_last, utility, workers)
        order = [(d, r) for d, r in order if (d.name, r.label) not in computed]
    for domain, row in order:
        yield domain, row, _safe_cell(run, domain, row)


def _generate_sp_sets(run: S2LRun, missing: list[tuple[Domain, Row]]) -> None:
    """The SP sets the missing cells need, here on every thread before any worker starts, so no two
    workers generate one set."""
    for source in dict.fromkeys(s for d, r in missing if (s := run.sp_source(d, r))):
        try:
            run.sp_set(*source)
        except Exception:  # noqa: BLE001 - each cell that needs the set tries again and reports the error
            pass


def _pooled_cells(run: S2LRun, missing: list[tuple[Domain, Row]], utility: bool, workers: int) -> Iterator[tuple[Domain, Row, TableCell]]:
    log(f"{len(missing)} cells{' and utility' if utility else ''} to compute in {workers} worker processes")
    threads = max(1, torch.get_num_threads() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(run.config, threads))
    try:
        if utility:  # the longest task first
            pool.submit(_worker_utility)
        futures = {pool.submit(_worker_cell, d.name, r): (d, r) for d, r in missing}
        for future in as_completed(futures):
            yield *futures[future], future.result()
    finally:  # on an error or Ctrl-C no queued task starts; what finished is in the store
        pool.shutdown(wait=True, cancel_futures=True)


def _safe_cell(run: S2LRun, domain: Domain, row: Row) -> TableCell:
    try:
        return run.run_cell(domain, row)
    except ConfigError:
        raise
    except Exception as exc:  # one broken cell must not lose the others; it is reported as failed
        return TableCell(row.label, row.shaker, row.data, Status.FAILED, f"{type(exc).__name__}: {exc}")


_WORKER_RUN: S2LRun | None = None  # a worker process's own run: the same config, store and deployed model


def worker_threads(threads: int) -> None:
    """A cell worker's thread counts: torch's, and the BLAS pool numpy and scipy use (the Frechet
    distance's matrix square root), which otherwise spans every core - so a cell rounds alike in a
    local worker and in a Ray task (Ray sets OMP_NUM_THREADS to a task's CPUs)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def worker_run(config: Config, threads: int) -> S2LRun:
    """The run a worker process (local or a Ray task's) computes its cells with, on ``threads``
    threads and with stdout silenced: the parent logs each cell, and a worker's setup lines would
    repeat per worker."""
    worker_threads(threads)
    sys.stdout = open(os.devnull, "w")
    return S2LRun(config)


def exit_with_parent(every: float = 5.0) -> threading.Thread:
    """Exit this process once its parent is gone. A parent killed outright (SIGKILL, or SIGTERM to
    the parent alone) never shuts its pool down, and its workers would otherwise sit on - or finish
    queued cells - while competing with the next run for the cores; what they finished is in the store."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def _start_worker(config: Config, threads: int) -> None:
    global _WORKER_RUN
    exit_with_parent()
    _WORKER_RUN = worker_run(config, threads)


def _worker_utility() -> None:
    _WORKER_RUN.utility()


def _worker_cell(domain_name: str, row: Row) -> TableCell:
    domain = next(d for d in _WORKER_RUN.domains if d.name == domain_name)
    return _safe_cell(_WORKER_RUN, domain, row)

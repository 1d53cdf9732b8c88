"""The defense x attack matrix: every defense's S2L table, flattened into gate cells.

A defense's table is the S2L table (`table.py`) with [matrix] rows, run under that
defense; each (row, measure, domain) of it becomes one cell of results.json
(schema below), which `s2l_guard/gates.py` judges and `s2l_guard/report.py` draws.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from s2l_guard import __version__
from s2l_guard.cache import content_key
from s2l_guard.config import Config
from s2l_guard.errors import ConfigError, S2LError
from s2l_guard.metrics import rate_with_interval
from s2l_guard.results import POOLED, Amplification, GateCell, RowInfo, Status, TableCell, Timing
from s2l_guard.runtime import log, resolve_device

from .cells import cell_workers
from .plan import PlannedCell, defended_config, domain_names, draws, plan, seeds, units
from .settings import check_plugins
from .table import run_attack

SCHEMA = "s2l-guard/matrix/1"


FPR_KEY = "0.01"  # TPR is gated at 1% FPR


def code_version() -> str:
    """The package version and, in a git checkout, the commit (``+dirty`` with local changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return __version__
    if commit.returncode != 0:
        return __version__
    return f"{__version__}+{commit.stdout.strip()}" + ("-dirty" if dirty.stdout.strip() else "")


def _amplification(entry: dict | None) -> dict | None:
    """A DeltaTest dict cut to what a gate and a reader need."""
    return None if entry is None else Amplification.from_dict(entry).to_dict()


def _mia_metrics(entry: dict, pooled: bool) -> tuple[dict, dict]:
    roc = entry["roc"]
    # Gated: the TPR an attacker reaches on new samples (threshold fitted on a calibration split).
    tpr = dict(entry["tpr_calibrated"], protocol="threshold fitted on a calibration split, measured on the disjoint test split")
    in_sample = dict(roc["tpr_at_fpr"][FPR_KEY], resolvable=roc["resolvable"][FPR_KEY])
    metrics: dict[str, Any] = {"auc": roc["auc"], "tpr_at_1pct_fpr": tpr, "tpr_at_1pct_fpr_in_sample": in_sample}
    amp, tamp = _amplification(entry.get("auc_delta")), _amplification(entry.get("tpr_delta"))  # a domain's row and a pooled one alike
    if amp:
        metrics["auc_amplification"] = amp
    if tamp:
        metrics["tpr_amplification"] = tamp
    if not pooled and entry.get("curve"):
        metrics["roc_curve"] = entry["curve"]
    return metrics, {"members": roc["n_members"], "nonmembers": roc["n_nonmembers"], "bootstrap": roc["resamples"]}


def _excess(entry: dict) -> dict:
    return {"value": entry["excess"], "ci95": entry["ci95"], "method": entry["method"]}


def _extraction_metrics(entry: dict, pooled: bool, sizes: tuple[int, int]) -> tuple[dict, dict]:
    """The extraction cell's counts; ``sizes``: the members and non-members its candidates were matched against."""
    if pooled:
        n_domains = len(entry["extracted_per_domain"])
        metrics = {"extracted": int(sum(entry["extracted_per_domain"])), "withheld": entry["withheld"],
                   "nonmembers_matched": int(sum(entry["nonmembers_matched_per_domain"])), "extracted_above_null": _excess(entry["above_null"])}  # fmt: skip
        samples = {"candidates": entry["candidates_per_domain"] * n_domains, "domains": n_domains, "members": sizes[0], "nonmembers": sizes[1]}
    else:
        metrics = {"extracted": entry["extracted_images"], "withheld": entry.get("withheld", 0),
                   "nonmembers_matched": entry["nonmembers_matched"], "extracted_above_null": _excess(entry["above_null"]),
                   "nearest_distance_median": entry.get("nearest_distance_median")}  # fmt: skip
        samples = {"candidates": entry["candidates"], "members": sizes[0], "nonmembers": sizes[1]}
    amp = _amplification(entry.get("above_null_delta_vs_pretrained"))  # a domain's row and a pooled one alike
    if amp:
        metrics["extraction_amplification"] = amp
    return metrics, samples


def _cell(planned: PlannedCell, entry: dict | None, unavailable: list[str], threat_model: str, sizes: tuple[int, int] = (0, 0)) -> GateCell:
    """The gate cell of ``planned``, read from its table's row (``entry``: per-domain or pooled);
    ``sizes``: the members and non-members of its domain (or of every domain, pooled)."""
    pooled = planned.domain == POOLED
    blank = _blank(planned, threat_model)
    if entry is None:
        return replace(blank, status=Status.FAILED, reason="the table has no such cell")
    blank = replace(blank, row=RowInfo(entry.get("shaker"), entry.get("data"), entry.get("variant") or ""))
    if planned.measure in unavailable:
        return replace(blank, status=Status.NOT_RUN, reason=f"{planned.measure} needs the model's weights, which {threat_model} does not give")
    status = entry.get("status", "ok")
    if status != "ok":
        reasons = entry.get("reasons") or [entry.get("reason") or ""]
        return replace(blank, status=Status(status), reason="; ".join(r for r in reasons if r))
    if "mia" not in entry:  # the domain's pre-trained baseline did not run, so nothing could be compared
        return replace(blank, status=Status.FAILED, reason="the pre-trained model's cell of this domain failed; see the pretrained row")
    if planned.measure == "extraction":
        metrics, samples = _extraction_metrics(entry["extraction"], pooled, sizes)
    else:
        metrics, samples = _mia_metrics(entry["mia"][planned.measure], pooled)
    measured = replace(blank, status=Status.OK, metrics=metrics, samples=samples)
    if pooled:
        return replace(measured, refused_domains=tuple(entry.get("refused_domains", [])))
    return replace(measured, timing=Timing(entry.get("seconds"), entry.get("cached")))


def _blank(planned: PlannedCell, threat_model: str | None) -> GateCell:
    """A cell's identity; its status is set by whoever fills it in."""
    return GateCell(planned.id, planned.defense, threat_model, planned.attack, planned.measure, planned.domain, planned.seed, Status.FAILED,
                    draw=planned.draw)  # fmt: skip


def utility_cell(planned: PlannedCell, utility: dict, threat_model: str) -> GateCell:
    """The deployed model's conditional accuracy with a Wilson interval over the served generations."""
    blank = _blank(planned, threat_model)
    if utility.get("status") != "ok":
        return replace(blank, status=Status.NOT_RUN, reason=utility.get("reason", "utility was not measured"))
    domains = utility["domains"].values()
    served = sum(d["served"] for d in domains)
    metrics = {"served_share": utility["served_share"], "frechet_distance": utility["frechet_distance"],
               "heldout_denoising_loss": utility["heldout_denoising_loss"]}  # fmt: skip
    if utility.get("evaluator", "digits") is not None:  # a classifier read the generations (the testbed's digits)
        correct = sum(round(d["conditional_accuracy"] * d["served"]) for d in domains if d["conditional_accuracy"] is not None)
        accuracy = rate_with_interval(correct, served)
        metrics = {"conditional_accuracy": {"value": accuracy["rate"], "ci95": accuracy["ci95"], "n": served}} | metrics
    return replace(blank, status=Status.OK, metrics=metrics, samples={"generations": served})


def table_cells(planned: list[PlannedCell], results: dict) -> list[GateCell]:
    """The planned cells of one defense and seed, read from its S2L table's results."""
    d = results["defense"]
    rows = {r["row"]: r for r in results["table"] if "draws" not in r}
    domains = results["domains"]
    pooled_sizes = (sum(v.get("members", 0) for v in domains.values()), sum(v.get("nonmembers", 0) for v in domains.values()))
    out = []
    for p in planned:
        if p.measure == "utility":
            out.append(utility_cell(p, results["utility"], d["threat_model"]))
            continue
        entry = rows.get(p.attack) if p.domain == POOLED else domains.get(p.domain, {}).get("rows", {}).get(p.attack)
        mine = domains.get(p.domain, {})
        sizes = pooled_sizes if p.domain == POOLED else (mine.get("members", 0), mine.get("nonmembers", 0))
        out.append(_cell(p, entry, d["unavailable_mia"], d["threat_model"], sizes))
    return out


def failed_cells(planned: list[PlannedCell], error: str) -> list[GateCell]:
    return [replace(_blank(p, None), reason=error) for p in planned]


class Progress:
    """One bar over every (defense, domain, row) table cell, with an ETA from the cells computed so
    far (cached cells cost nothing; a defense's own pre-training is not in it); without a
    terminal, one log line per cell instead."""

    def __init__(self, total: int, workers: int = 1):
        from tqdm import tqdm

        self.total, self.done, self.seconds, self.workers = total, 0, 0.0, workers
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, unit="cell", desc="matrix", dynamic_ncols=True) if sys.stderr.isatty() else None

    def __call__(self, cell: TableCell, label: str) -> None:
        self.done += 1
        if not cell.cached and cell.seconds is not None:
            self.seconds += cell.seconds / self.workers  # side by side in the workers
        eta = (self.total - self.done) * self.seconds / self.done  # the share of cached cells so far carries on
        took = "cached" if cell.cached else cell.status.value if not cell.ok else f"{cell.seconds or 0:.1f} s"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{label} ({took})", refresh=False)
            self.bar.update()
        else:
            log(
                f"matrix cell {self.done}/{self.total}: {label} ({took}); {time.perf_counter() - self.start:.0f} s elapsed, cells ETA {eta / 60:.1f} min (pre-trainings not counted)"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_matrix(config: Config, defenses: list[str] | None = None) -> dict:
    """Run (or load from the cache) every defense's table and return results.json's content.

    ``defenses`` restricts the run (the gate suite runs only the selected defenses and the
    undefended control). A defense whose table cannot start (its pre-training crashed) has all
    its cells reported as failed with the error; bad input (an S2LError: a broken config, model
    folder or data set) stops the run with its one-line message.
    """
    start = time.perf_counter()
    config = check_plugins(config)
    names = list(defenses or config.matrix.defenses)
    planned = plan(config, names)
    table_units = sum(1 for p in planned if p.measure == "extraction" and p.domain != POOLED)  # one per (domain, row)
    progress = Progress(table_units, cell_workers(config, resolve_device(config.run.device)))
    cells, tables = [], {}
    try:
        for seed, draw in units(config):
            for defense in names:
                mine = [p for p in planned if p.defense == defense and p.seed == seed and p.draw == draw]
                label = f"{defense}" + (f" seed {seed}" if len(seeds(config)) > 1 else "") + (f" draw {draw}" if len(draws(config)) > 1 else "")
                key = table_key(defense, seed, draw)
                log(f"matrix: {label} ({names.index(defense) + 1}/{len(names)})")
                try:
                    results = run_attack(defended_config(config, defense, seed, draw), progress=lambda c, lb=label: progress(c, f"{lb} {c.row}"))
                except S2LError:  # bad input (config, model folder, data set): every defense would stop on it
                    raise
                except Exception as exc:  # noqa: BLE001 - one defense's crash must not lose the others
                    error = f"{type(exc).__name__}: {exc}"
                    log(f"matrix: {label} failed: {error}")
                    cells += failed_cells(mine, error)
                    tables[key] = {"status": "failed", "reason": error}
                    continue
                cells += table_cells(mine, results)
                tables[key] = {
                    "status": "ok", "defense": defense, "seed": seed, "draw": draw, "threat_model": results["defense"]["threat_model"],
                    "report": results["defense"], "utility": results["utility"], "wall_seconds": results["wall_seconds"],
                    "artifacts": results["artifacts"], "method": results["method"],
                }  # fmt: skip
    finally:
        progress.close()
    results = matrix_results(config, names, tables, [cell.to_dict() for cell in cells], time.perf_counter() - start)
    results["blind"] = blind_baselines(config)
    return results


def blind_baselines(config: Config) -> dict[str, dict[str, dict]]:
    """The blind baseline (:mod:`s2l_guard.blind`) on every replicate's audited data: per domain and
    pooled, can a classifier on the images alone tell its members from its non-members? By
    replicate (as a string, JSON's keys), then domain; each entry says whether it fires and the
    message a gate gives when it does."""
    from attacks.s2l import split_domains
    from s2l_guard.blind import blind_baseline
    from s2l_guard.cache import Store
    from s2l_guard.data import load_imagefolder

    from .stages import testbed_stage

    out = {}
    for seed in seeds(config):
        replicate = config.replace(run={"seed": seed})
        dataset = load_imagefolder(testbed_stage(Store(replicate.run.store), replicate).path)
        domains, _ = split_domains(dataset, replicate.attack.domains)
        parts = {d.name: (d.members.images, d.nonmembers.images) for d in domains}
        if len(domains) > 1:
            parts[POOLED] = tuple(torch.cat([p[i] for p in parts.values()]) for i in (0, 1))
        entries = {}
        for name, (members, nonmembers) in parts.items():
            folds = min(5, len(members), len(nonmembers))  # k-fold needs k images of each kind
            if folds < 2:
                entries[name] = {"fires": False, "reason": f"{len(members)} members vs {len(nonmembers)} non-members: too few to cross-validate"}
                continue
            result = blind_baseline(members, nonmembers, folds=folds, resamples=config.attack.bootstrap, seed=seed, margin=config.gates.blind_margin)
            entries[name] = dict(result.to_dict(), message=result.message())
        out[str(seed)] = entries
    return out


def table_key(defense: str, seed: int, draw: int = 0) -> str:
    """A table's key in results.json's ``tables``: ``none/0``, ``none/0/draw2``."""
    return f"{defense}/{seed}" + (f"/draw{draw}" if draw else "")


def matrix_results(config: Config, defenses: list[str], tables: dict, cells: list[dict], seconds: float) -> dict:
    """results.json's content (docs/results.md)."""
    return {
        "schema": SCHEMA,
        "s2l_guard_version": __version__,
        "code_version": code_version(),
        "config_source": config.source,
        "config": config.to_dict(),
        "seeds": seeds(config),  # the testbed replicates
        "draws": draws(config),
        "defenses": defenses,
        "domains": domain_names(config),
        "tables": tables,
        "cells": cells,
        "wall_seconds": round(seconds, 2),
    }


def matrix_folder(config: Config) -> Path:
    """``runs/<profile>-matrix-<hash>/``; thresholds ([gates]) are left out of the hash, since
    they change verdicts, not measurements. Hashed with ``"all"`` expanded, so the CLI and the
    gate suite (which load the profile differently) find the same folder."""
    measured = {k: v for k, v in check_plugins(config).measured_dict().items() if k != "gates"}
    return Path(config.run.out_dir) / f"{config.name}-matrix-{content_key('matrix', measured)[:8]}"


def write_matrix(results: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    return folder / "results.json"


def config_of(results: dict) -> Config:
    """The Config a matrix ran with: results.json stores it resolved, as a dict, which
    ``replace`` validates back into a Config (settings added since then take their defaults, and
    renamed ones are read under their new names)."""
    return Config(source=results["config_source"]).replace(**upgrade_config(results["config"]))


def upgrade_config(config: dict) -> dict:
    """A resolved config from before draws: [matrix] seeds read as replicates, the count thresholds of
    extraction dropped (thresholds change verdicts, not measurements; the current ones apply)."""
    config = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    if "seeds" in config.get("matrix", {}):
        config["matrix"]["replicates"] = config["matrix"].pop("seeds")
    for old in ("max_extracted", "max_baseline_extracted"):
        config.get("gates", {}).pop(old, None)
    return config


def load_matrix(folder: Path) -> dict:
    """results.json of a matrix run (its run folder, or the file itself), checked to be one."""
    path = Path(folder) if Path(folder).is_file() else Path(folder) / "results.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; run `s2l-guard matrix` first, or drop --s2l-reuse to run it")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); delete it and rerun the matrix") from None
    if results.get("schema") != SCHEMA:
        raise ConfigError(f"{path} has schema {results.get('schema')!r}, not {SCHEMA!r}; rerun `s2l-guard matrix` to rewrite it")
    return results

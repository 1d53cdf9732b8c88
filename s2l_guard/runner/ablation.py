"""Ablations of the S2L paper: leakage against LoRA rank, Textual Inversion tokens and Gaussian sigma.

Li et al., "Shake to Leak" (SaTML 2024), sec. "How the leakage amplification
happens?": with LoRA, leakage rises as the rank falls, then drops sharply
below a threshold; with Textual Inversion, more learned tokens help up to a
point; Gaussian perturbation amplifies MIA in small models, rising then
falling as sigma grows. Each ablation runs the same cells as the S2L table
(cached in the same store), one row per swept value, and writes a table and a
plot of leakage against the value.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from s2l_guard.config import Config
from s2l_guard.formatting import format_interval, short_count

from .cells import S2LRun, run_cells
from .plan import DataKind, Row, gaussian_row
from .settings import shaker_settings
from .summaries import pooled


@dataclass(frozen=True)
class Ablation:
    shaker: str
    setting: str  # the shaker setting that is swept
    data: DataKind  # SP (fine-tuning on the SP set) or NONE (Gaussian: no data)
    values: Callable[[Config], tuple]
    draws: Callable[[Config], int]
    axis: str  # x-axis label
    log_x: bool


ABLATIONS = {
    "lora-rank": Ablation("lora", "rank", DataKind.SP, lambda c: c.ablation.lora_ranks, lambda c: 1, "LoRA rank", True),
    "ti-tokens": Ablation(
        "textual_inversion", "num_vectors", DataKind.SP, lambda c: c.ablation.ti_tokens, lambda c: 1, "learned TI vectors", True
    ),  # fmt: skip
    "gaussian": Ablation(
        "gaussian", "sigma", DataKind.NONE, lambda c: c.ablation.gaussian_sigmas, lambda c: c.ablation.gaussian_draws, "Gaussian sigma", True
    ),  # fmt: skip
}


def ablation_rows(ablation: Ablation, config: Config) -> list[tuple[Any, Row]]:
    """(swept value, row) pairs. The configured value of a fine-tune setting is the S2L
    table's own row, so the ablation reuses that cached cell instead of training it again."""
    pairs = []
    configured = None if ablation.shaker == "gaussian" else getattr(shaker_settings(config, ablation.shaker), ablation.setting)
    for value in ablation.values(config):
        for draw in range(ablation.draws(config)):
            if ablation.shaker == "gaussian":  # the same labels as the table's Gaussian rows
                row = gaussian_row(value, draw)
            elif value == configured:
                row = Row(ablation.shaker, ablation.shaker, ablation.data)
            else:
                row = Row(f"{ablation.shaker}-{ablation.setting}{value:g}", ablation.shaker, ablation.data, ((ablation.setting, value),), draw)
            pairs.append((value, row))
    return pairs


def run_ablation(run: S2LRun, name: str) -> dict[str, Any]:
    """Run one ablation; return its results (per value: leakage pooled over domains, mean over draws)."""
    ablation = ABLATIONS[name]
    config = run.config
    start = time.perf_counter()
    pairs = ablation_rows(ablation, config)
    rows = [Row("pretrained", None, DataKind.NONE)] + [row for _, row in pairs]
    cells = run_cells(run, rows)
    seed = config.run.seed
    entries = {row.label: pooled(cells, row.label, "pretrained", config, seed) for row in rows}
    primary = config.attack.mia[0]
    points = []
    for value in ablation.values(config):
        draws = [entries[r.label] for v, r in pairs if v == value and entries[r.label]["status"] == "ok"]
        if not draws:
            labels = {r.label for v, r in pairs if v == value}
            reasons = sorted({c[label].reason or c[label].status.value for c in cells.values() for label in labels if label in c})
            points.append({"value": value, "status": "failed", "reasons": reasons})
            continue
        deltas = [d["mia"][primary]["auc_delta"] for d in draws]
        points.append({
            "value": value, "status": "ok", "draws": len(draws),
            "trainable_parameters": draws[0]["trainable_parameters"],
            "auc": float(np.mean([d["mia"][primary]["roc"]["auc"]["value"] for d in draws])),
            "auc_delta": float(np.mean([d["delta"] for d in deltas])),
            # one draw: its paired-bootstrap interval; several: the spread of the draws' deltas
            "auc_delta_ci95": deltas[0]["ci95"] if len(draws) == 1 else [min(d["delta"] for d in deltas), max(d["delta"] for d in deltas)],
            "extracted_per_domain": float(np.mean([d["extraction"]["extracted_per_domain_mean"] for d in draws])),
        })  # fmt: skip
    base = entries["pretrained"]
    return {
        "ablation": name, "shaker": ablation.shaker, "setting": ablation.setting, "mia": primary,
        "config": config.to_dict(), "seed": seed, "domains": list(cells),
        "pretrained": {"auc": base["mia"][primary]["roc"]["auc"]["value"], "extracted_per_domain": base["extraction"]["extracted_per_domain_mean"]},
        "points": points,
        "interval": "one draw: paired-bootstrap 95% interval of the AUC change; several draws: min and max over draws",
        "wall_seconds": round(time.perf_counter() - start, 2),
    }  # fmt: skip


def format_ablation(results: dict) -> str:
    """A Markdown table: one row per swept value."""
    lines = [
        f"| {results['setting']} | trainable params | {results['mia']} AUC | dAUC vs pre-trained | extracted / domain |",
        "|---|---|---|---|---|",
    ]
    for p in results["points"]:
        if p["status"] != "ok":
            lines.append(f"| {p['value']:g} | {p['status']}: {'; '.join(p.get('reasons', []))} | | | |")
            continue
        draws = f" (mean of {p['draws']})" if p["draws"] > 1 else ""
        lines.append(f"| {p['value']:g} | {short_count(p['trainable_parameters'])} | {p['auc']:.3f}{draws} | "
                     f"{format_interval(p['auc_delta'], p['auc_delta_ci95'], signed=True)} | {p['extracted_per_domain']:.1f} |")  # fmt: skip
    pre = results["pretrained"]
    lines.append(f"\npre-trained: AUC {pre['auc']:.3f}, extracted / domain {pre['extracted_per_domain']:.1f}; "
                 f"domains {', '.join(results['domains'])}; interval: {results['interval']}")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_ablation(results: dict, path: Path) -> Path:
    """Leakage against the swept value: AUC change (with its interval) and extracted images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ablation = ABLATIONS[results["ablation"]]
    ok = [p for p in results["points"] if p["status"] == "ok"]
    x = [p["value"] for p in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    delta = np.array([p["auc_delta"] for p in ok])
    ci = np.array([p["auc_delta_ci95"] for p in ok]).reshape(-1, 2)
    left.errorbar(x, delta, yerr=[delta - ci[:, 0], ci[:, 1] - delta], marker="o", capsize=3)
    left.axhline(0, color="grey", lw=0.8)
    left.set_ylabel(f"{results['mia']} AUC change vs pre-trained")
    right.plot(x, [p["extracted_per_domain"] for p in ok], marker="o")
    right.axhline(results["pretrained"]["extracted_per_domain"], color="grey", lw=0.8, ls="--", label="pre-trained")
    right.set_ylabel("extracted members / domain")
    right.legend(fontsize=7)
    from matplotlib.ticker import NullFormatter

    for ax in (left, right):
        ax.set_xlabel(ablation.axis)
        if ablation.log_x:
            ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])  # label the swept values only; log minor labels collide
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(f"S2L ablation: {results['ablation']} ({', '.join(results['domains'])})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_ablation(run_dir: Path, results: dict) -> list[Path]:
    name = results["ablation"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"ablation-{name}.json").write_text(json.dumps(results, indent=1))
    (run_dir / f"ablation-{name}.md").write_text(f"# S2L ablation: {name}\n\n" + format_ablation(results))
    return [run_dir / f"ablation-{name}.json", run_dir / f"ablation-{name}.md", plot_ablation(results, run_dir / f"ablation-{name}.png")]

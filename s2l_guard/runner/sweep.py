"""The privacy-utility-leakage frontier: each DP defense at a range of epsilons (``s2l-guard sweep epsilon``).

Every point is the matrix of one defense with its ``target_epsilon`` set (``inf``: the same
recipe, clipping included, without noise), computed and cached like any matrix run, so an
interrupted sweep resumes point by point. The undefended model is the reference. Per point, pooled
over the attacked domains with 95% intervals: utility (conditional accuracy of the private and of
the public domains, Frechet distance), the released model's leakage (each MIA's AUC and TPR at 1%
FPR, extraction above the held-out null), S2L's amplification (each fine-tune's paired AUC change
on the SP set) and the empirical epsilon the MIA scores imply beside the accountant's.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from s2l_guard.cache import content_key
from s2l_guard.config import Config
from s2l_guard.errors import SettingsError
from s2l_guard.formatting import format_interval
from s2l_guard.metrics import rate_with_interval
from s2l_guard.results import Status, gate_cells
from s2l_guard.runtime import log

from .matrix import run_matrix
from .plan import seeds

EPSILONS = (1.0, 3.0, 10.0, 30.0, 100.0, math.inf)
DP_DEFENSES = ("dp_sgd", "private_finetune")
REFERENCE = "none"


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"1,3,10,inf"`` -> (1.0, 3.0, 10.0, inf), each > 0."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SettingsError(f"--epsilons {text!r} is not a comma-separated list of numbers; use e.g. 1,3,10,inf") from None
    if not values or any(not v > 0 for v in values):
        raise SettingsError(f"--epsilons {text!r} needs at least one epsilon, each > 0 (inf: no noise); use e.g. 1,3,10,inf")
    return values


def epsilon_config(config: Config, defense: str, epsilon: float) -> Config:
    """``config`` with ``defense``'s target_epsilon set (its other settings kept)."""
    table = dict(config.defenses.get(defense, {})) | {"target_epsilon": epsilon}
    return config.replace(defenses={defense: table})


def sweep_folder(config: Config, defenses, epsilons) -> Path:
    measured = {k: v for k, v in config.measured_dict().items() if k != "gates"}  # [matrix] rows decide what each point measures
    key = content_key("sweep", {"config": measured, "defenses": list(defenses), "epsilons": [str(e) for e in epsilons]})
    return Path(config.run.out_dir) / f"{config.name}-sweep-epsilon-{key[:8]}"


def run_sweep(config: Config, defenses=DP_DEFENSES, epsilons=EPSILONS) -> dict:
    """Every (defense, epsilon) point, and the undefended reference; see the module docstring."""
    from .settings import defense_settings

    for name in defenses:  # defense_settings refuses an unknown name with a "did you mean"
        if not hasattr(defense_settings(config, name), "target_epsilon"):
            raise SettingsError(f"defense {name} has no target_epsilon to sweep; sweep {', '.join(DP_DEFENSES)}")
    start = time.perf_counter()
    jobs = [(REFERENCE, None)] + [(name, epsilon) for name in defenses for epsilon in epsilons]
    points = []
    for i, (name, epsilon) in enumerate(jobs, start=1):
        log(f"sweep: {name}" + (f" at epsilon {epsilon:g}" if epsilon is not None else " (the reference)") + f" ({i}/{len(jobs)})")
        point_config = config if epsilon is None else epsilon_config(config, name, epsilon)
        results = run_matrix(point_config, [name])
        points.append(point_summary(results, name, epsilon, config))
    return {
        "sweep": "epsilon",
        "config": config.to_dict(),
        "defenses": list(defenses),
        "epsilons": list(epsilons),
        "seed": seeds(config)[0],
        "mia": list(config.attack.mia),
        "shakers": list(config.matrix.shakers),
        "points": points,
        "interval": "95%: bootstrap over members and non-members (AUC, its paired change), Clopper-Pearson (TPR), "
        "Wilson over the generations (accuracy); pooled over the attacked domains",
        "wall_seconds": round(time.perf_counter() - start, 2),
    }


def _value(entry: dict | None) -> dict | None:
    """A metric as {"value", "ci95"}, whatever its kind (a rate, an interval, a paired change)."""
    if not entry:
        return None
    value = entry.get("value", entry.get("delta", entry.get("rate")))
    return {"value": value, "ci95": entry.get("ci95")}


def point_summary(results: dict, defense: str, epsilon: float | None, config: Config) -> dict:
    """One point of the frontier, read from its matrix run's pooled cells, utility and privacy report."""
    seed = results["seeds"][0]
    table = results["tables"].get(f"{defense}/{seed}", {})
    point = {"defense": defense, "target_epsilon": epsilon, "status": table.get("status", "failed")}
    if point["status"] != "ok":
        return point | {"reason": table.get("reason", "the matrix has no table for it")}
    cells = {(c.attack, c.measure): c for c in gate_cells(results) if c.pooled and c.seed == seed and c.defense == defense}

    def metric(attack: str, measure: str, key: str) -> dict | None:
        cell = cells.get((attack, measure))
        return _value(cell.metric(key)) if cell is not None and cell.status == Status.OK else None

    report = table["report"]
    privacy = report.get("pretraining", {}).get("privacy") or {}
    empirical = {mia: bound["epsilon"] for mia, bound in (report.get("empirical_epsilon") or {}).items()}
    point |= {
        "epsilon": privacy.get("epsilon"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "steps": privacy.get("steps"),
        "empirical_epsilon": empirical,
        "accuracy": _accuracies(table["utility"], config),
        "frechet_distance": table["utility"].get("frechet_distance"),
        "released": {mia: {"auc": metric("pretrained", mia, "auc"), "tpr_at_1pct_fpr": metric("pretrained", mia, "tpr_at_1pct_fpr")}
                     for mia in config.attack.mia},
        "extraction_above_null": metric("pretrained", "extraction", "extracted_above_null"),
        "amplification": {shaker: {mia: metric(shaker, mia, "auc_amplification") for mia in config.attack.mia}
                          | {"extraction": metric(shaker, "extraction", "extraction_amplification")}
                          for shaker in config.matrix.shakers},
        "wall_seconds": table.get("wall_seconds"),
    }  # fmt: skip
    return point


def _accuracies(utility: dict, config: Config) -> dict:
    """Conditional accuracy of the private and of the public digit domains, each with its Wilson interval."""
    if utility.get("status") != "ok":
        return {}
    out = {}
    for side, digits in (("private", config.testbed.private_domains), ("public", config.testbed.public_domains)):
        domains = [utility["domains"][f"digit{d}"] for d in digits if f"digit{d}" in utility["domains"]]
        domains = [d for d in domains if d.get("conditional_accuracy") is not None]
        served = sum(d["served"] for d in domains)
        if served:
            correct = sum(round(d["conditional_accuracy"] * d["served"]) for d in domains)
            out[side] = _value(rate_with_interval(correct, served)) | {"n": served}
    return out


def _fmt(entry: dict | None, *, signed: bool = False, digits: int = 3) -> str:
    return "-" if not entry or entry.get("value") is None else format_interval(entry["value"], entry.get("ci95"), signed=signed, digits=digits)


def _epsilon_label(epsilon) -> str:
    if epsilon is None:
        return "-"
    return "inf" if math.isinf(epsilon) else f"{epsilon:.3g}"


def format_sweep(results: dict) -> str:
    """The frontier as a Markdown table, one row per point, and where leakage and amplification come back."""
    mias, shakers = results["mia"], results["shakers"]
    header = (["defense", "target epsilon", "accountant epsilon", "private accuracy", "public accuracy", "FD"]
              + [f"released {m} AUC" for m in mias] + [f"{mias[0]} TPR@1%FPR", "extraction above null"]
              + [f"{s} dAUC {mias[0]}" for s in shakers] + ["empirical epsilon (max over MIAs)"])  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in results["points"]:
        if p["status"] != "ok":
            lines.append(
                f"| {p['defense']} | {_epsilon_label(p['target_epsilon'])} | {p['status']}: {p.get('reason', '')} |" + " |" * (len(header) - 3)
            )
            continue
        fd = p["frechet_distance"]
        empirical = max(p["empirical_epsilon"].values(), default=None)
        row = ([p["defense"], _epsilon_label(p["target_epsilon"]), _epsilon_label(p["epsilon"]),
                _fmt(p["accuracy"].get("private")), _fmt(p["accuracy"].get("public")), "-" if fd is None else f"{fd:.2f}"]
               + [_fmt(p["released"][m]["auc"]) for m in mias] + [_fmt(p["released"][mias[0]]["tpr_at_1pct_fpr"]),
                                                                  _fmt(p["extraction_above_null"], signed=True, digits=1)]
               + [_fmt(p["amplification"][s][mias[0]], signed=True) for s in shakers]
               + ["-" if empirical is None else f"{empirical:.2f}"])  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *comeback_lines(results), "", f"intervals: {results['interval']}"]
    return "\n".join(lines) + "\n"


def comeback_lines(results: dict) -> list[str]:
    """Per defense: the smallest epsilon at which the released model's leakage is above chance
    (some MIA's AUC interval above 0.5) and at which S2L amplifies (some paired change's interval
    above 0), naming the MIAs (and fine-tunes) that show it there - the table shows only the first MIA."""
    lines = []
    for defense in results["defenses"]:
        points = sorted((p for p in results["points"] if p["defense"] == defense and p["status"] == "ok"), key=lambda p: p["target_epsilon"])
        leaks = [(p["target_epsilon"], [m for m in results["mia"] if _above(p["released"][m]["auc"], 0.5)]) for p in points]
        amplifies = [(p["target_epsilon"], [f"{s} {m}" for s in results["shakers"] for m in results["mia"] if _above(p["amplification"][s][m], 0.0)])
                     for p in points]  # fmt: skip

        def say(found):
            first = next(((epsilon, names) for epsilon, names in found if names), None)
            return f"from epsilon {_epsilon_label(first[0])} ({', '.join(first[1])})" if first else "at no epsilon swept"

        lines.append(f"{defense}: the released model leaks (an MIA's AUC interval above 0.5) {say(leaks)}; "
                     f"S2L amplifies (an AUC change's interval above 0) {say(amplifies)}")  # fmt: skip
    return lines


def _above(entry: dict | None, level: float) -> bool:
    return bool(entry and entry.get("ci95") and entry["ci95"][0] > level)


def plot_sweep(results: dict, defense: str, path: Path) -> Path:
    """One defense's frontier: utility, the released model's leakage, S2L's amplification and the
    empirical epsilon, against the target epsilon (inf drawn one decade past the largest finite one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = sorted((p for p in results["points"] if p["defense"] == defense and p["status"] == "ok"), key=lambda p: p["target_epsilon"])
    reference = next((p for p in results["points"] if p["defense"] == REFERENCE and p["status"] == "ok"), None)
    finite = [p["target_epsilon"] for p in points if math.isfinite(p["target_epsilon"])]
    where = lambda e: e if math.isfinite(e) else 10 * max(finite or [1.0])  # noqa: E731
    x = [where(p["target_epsilon"]) for p in points]
    mias, shakers = results["mia"], results["shakers"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))

    def series(ax, entries, label, ref=None, **style):
        ok = [(xi, e) for xi, e in zip(x, entries) if e and e.get("value") is not None]
        if not ok:
            return
        xs, values = [xi for xi, _ in ok], np.array([e["value"] for _, e in ok])
        low = np.array([e["ci95"][0] if e.get("ci95") else e["value"] for _, e in ok])
        high = np.array([e["ci95"][1] if e.get("ci95") else e["value"] for _, e in ok])
        line = ax.errorbar(xs, values, yerr=[values - low, high - values], marker="o", capsize=3, label=label, **style)
        if ref and ref.get("value") is not None:
            ax.axhline(ref["value"], ls="--", lw=0.8, color=line[0].get_color())

    accuracy, leakage, amplification, epsilon = axes
    for side in ("private", "public"):
        series(accuracy, [p["accuracy"].get(side) for p in points], f"{side} digits", reference and reference["accuracy"].get(side))
    accuracy.set_ylabel("conditional accuracy")
    accuracy.set_ylim(-0.02, 1.02)
    for mia in mias:
        series(leakage, [p["released"][mia]["auc"] for p in points], f"{mia} AUC", reference and reference["released"][mia]["auc"])
    leakage.axhline(0.5, color="grey", lw=0.8)
    leakage.set_ylabel("released model: MIA AUC")
    for shaker in shakers:
        series(amplification, [p["amplification"][shaker][mias[0]] for p in points], f"{shaker}",
               reference and reference["amplification"][shaker][mias[0]])  # fmt: skip
    amplification.axhline(0, color="grey", lw=0.8)
    amplification.set_ylabel(f"S2L: {mias[0]} AUC change")
    for mia in mias:
        epsilon.plot(x, [p["empirical_epsilon"].get(mia, np.nan) for p in points], marker="o", label=f"from {mia}")
    epsilon.plot(finite, finite, ls=":", color="grey", label="claimed")
    epsilon.set_yscale("symlog", linthresh=1)
    epsilon.set_ylabel("empirical epsilon (lower bound)")
    labels = [_epsilon_label(p["target_epsilon"]) for p in points]
    from matplotlib.ticker import NullFormatter

    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(x, labels)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("target epsilon")
        ax.legend(fontsize=7)
    note = " (dashed: undefended model)" if reference else ""
    fig.suptitle(f"{defense}: privacy, utility and leakage against epsilon{note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep(folder: Path, results: dict) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps(results, indent=1))
    (folder / "sweep.md").write_text("# The epsilon frontier\n\n" + format_sweep(results))
    figures = [plot_sweep(results, defense, folder / f"sweep-{defense}.png") for defense in results["defenses"]]
    return [folder / "sweep.json", folder / "sweep.md", *figures]


__all__ = ["EPSILONS", "format_sweep", "parse_epsilons", "run_sweep", "sweep_folder", "write_sweep"]

"""The S2L table: run every (domain, row) cell of one config, summarise, print and write results.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from s2l_guard import __version__
from s2l_guard.config import Config
from s2l_guard.formatting import format_interval, short_count
from s2l_guard.results import TableCell

from .cells import S2LRun, run_cells
from .defense_summary import defense_lines
from .plan import plan_rows
from .settings import method_settings
from .stages import run_folder
from .summaries import controls_for, empirical_epsilon, gaussian_means, pooled, summarize_cell

SCHEMA = "s2l-guard/attack-results/1"


def run_attack(config: Config, progress: Callable[[TableCell], None] | None = None) -> dict:
    """Run the S2L table for every attacked domain; return results.json's content.

    ``progress`` is called with each finished (domain, row) cell instead of logging it.
    """
    start = time.perf_counter()
    run = S2LRun(config)
    config = run.config  # without the attacks the threat model rules out
    rows = plan_rows(config, adaptive=run.filters_finetune)
    cells_by_domain = run_cells(run, rows, progress, utility=True)
    seed = run.seed  # the attack draw's: bootstrap resamples and calibration splits vary with the draw
    domains_out = {}
    for domain in run.domains:
        cells = cells_by_domain[domain.name]
        base = cells["pretrained"]
        domains_out[domain.name] = {
            "prompt": domain.prompt, "members": len(domain.members), "nonmembers": len(domain.nonmembers),
            "rows": {label: summarize_cell(cell, base, config, seed, controls_for(cells, cell)) for label, cell in cells.items()},
        }  # fmt: skip
    table = [pooled(cells_by_domain, row.label, "pretrained", config, seed) for row in rows]
    table += gaussian_means(table, rows, config)
    results = {
        "schema": SCHEMA,
        "s2l_guard_version": __version__,
        "config_source": config.source,
        "config": config.to_dict(),
        "method_settings": method_settings(config),
        "seed": config.run.seed,
        "draw": config.run.draw,
        "artifacts": {"testbed": str(run.data_art.path), "bundle": str(run.bundle_art.path)},
        "method": _method(config),
        "defense": run.defense_report(),
        "utility": run.utility(),
        "table": table,
        "domains": domains_out,
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    privacy = results["defense"]["pretraining"].get("privacy")
    if privacy:  # a DP run: how small could its epsilon be, given what the attacks saw?
        results["defense"]["empirical_epsilon"] = empirical_epsilon(cells_by_domain, config, privacy["delta"])
    return results


def _method(config: Config) -> str:
    a, e = config.attack, config.extraction
    return (
        f"MIA: members vs held-out non-members of each domain, scores higher = member; AUC with {a.bootstrap}-resample "
        f"stratified bootstrap 95% intervals; TPR at 1% FPR calibrated: threshold fitted on a {a.calibration_share:g} "
        f"calibration split of the non-members, TPR measured on the disjoint test split (unresolvable under 100 test non-members). "
        f"Amplification: after minus before on the same samples (paired bootstrap; DeLong for AUC; TPR paired over test members). "
        f"Extraction: {e.candidates} candidates per domain and model; every member within (k={e.max_copies}, tiled L2, "
        f"delta={e.delta})-eidetic reach of a candidate counts; above null = members minus held-out non-members matched "
        f"by the same candidates; precision over candidates with >= {e.flag_neighbours} near-duplicate "
        f"generations within {e.flag_delta}; deltas at equal candidate counts with a candidate bootstrap."
    )


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The paper's table as strings: one row per method, pooled over the attacked domains."""
    primary = results["config"]["attack"]["mia"][0] if results["config"]["attack"]["mia"] else "mia"
    header = ["method", "data", "trainable params", f"{primary} AUC [95% CI]", "TPR@1%FPR (calibrated)", "extracted / domain",
              "above null, all domains [95% CI]", "d above null [95% CI]", "precision", "dAUC vs pre-trained [95% CI], p", "dAUC vs OoD", "dAUC vs OoD-gen",
              "best step: dAUC (oracle)"]  # fmt: skip
    out = []
    for row in results["table"]:
        line = [row["row"], row.get("data") or "-"]
        if row["status"] != "ok":
            out.append(line + [row["status"], (row.get("reasons") or [""])[0][:90]] + [""] * (len(header) - 4))
            continue
        line.append(short_count(row.get("trainable_parameters") or 0))
        stats = row["mia"].get(primary, {})
        if "draws" in row:  # a Gaussian mean row
            line += [f"{stats.get('auc_mean', float('nan')):.3f} (mean of {row['draws']} draws)", "",
                     f"{row['extraction']['extracted_per_domain_mean']:.1f}", "", "", "", f"{stats.get('auc_delta_mean', float('nan')):+.3f} (mean)", "", "", ""]  # fmt: skip
            out.append(line)
            continue
        roc = stats.get("roc")
        line.append(format_interval(roc["auc"]["value"], roc["auc"]["ci95"]) if roc else "")
        line.append(calibrated_tpr_text(stats.get("tpr_calibrated")) if roc else "")
        precision = row["extraction"]["precision"]
        excess = row["extraction"]["above_null"]
        moved = row["extraction"].get("above_null_delta_vs_pretrained")
        line += [f"{row['extraction']['extracted_per_domain_mean']:.1f}", format_interval(excess["excess"], excess["ci95"], signed=True, digits=1),
                 format_interval(moved["delta"], moved["ci95"], signed=True, digits=1) if moved else "",
                 "-" if precision is None else f"{precision:.2f}"]  # fmt: skip
        delta = stats.get("auc_delta")
        line.append(f"{format_interval(delta['delta'], delta['ci95'], signed=True)}, p={delta['p_value']:.2f}" if delta else "")
        for key in ("auc_delta_vs_ood_control", "auc_delta_vs_generated_ood_control"):
            control = stats.get(key)
            line.append(format_interval(control["delta"], control["ci95"], signed=True) if control else "")
        best = row.get("best_checkpoint")
        line.append(f"{best['delta']:+.3f} @ {best['step']}" if best else "")
        out.append(line)
    return header, out


def attack_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Every MIA side by side: per row, each attack's AUC and its paired change vs the pre-trained model.

    The paper's table shows one attack; which attack is strongest differs between
    models, and a verdict should not rest on the one that happens to be printed.
    """
    mias = results["config"]["attack"]["mia"]
    header = ["method", "data"] + [f"{m} AUC, dAUC [95% CI]" for m in mias]
    out = []
    for row in results["table"]:
        if row["status"] != "ok" or "draws" in row:  # Gaussian means: see the main table
            continue
        line = [row["row"], row.get("data") or "-"]
        for m in mias:
            auc, delta = row["mia"][m]["roc"]["auc"]["value"], row["mia"][m].get("auc_delta")
            line.append(f"{auc:.3f}" + (f", {format_interval(delta['delta'], delta['ci95'], signed=True)}" if delta else ""))
        out.append(line)
    return header, out


def calibrated_tpr_text(entry: dict | None) -> str:
    """A calibrated TPR for tables, marked where too few test non-members resolve 1% FPR."""
    if not entry:
        return ""
    text = f"{entry['value']:.3f}"
    return text if entry["resolvable"] else f"{text} (unresolvable, n={entry['test_nonmembers']})"


def _footer(results: dict) -> list[str]:
    first = results["table"][0].get("extraction", {})
    return [
        f"domains: {', '.join(results['domains'])}; extracted = mean distinct members per domain "
        f"of {first.get('candidates_per_domain', '?')} candidates",
        f"method: {results['method']}",
        "dAUC vs OoD / OoD-gen: paired against the same method trained on real images / on its own generations "
        "of a public digit (rows <method>-ood, <method>-ood-gen) where they ran, else against End-to-End's",
        "TPR@1%FPR (calibrated): threshold fitted on the calibration split, TPR on the test split; unresolvable, n=N: "
        "only N test non-members, under the 100 that 1% FPR needs",
        "above null: members minus held-out non-members that the same candidates match (chance matches of new digits); "
        "d above null: its change vs the pre-trained model",
        "best step: the fine-tuning step (trajectory or final) with the highest mean per-domain AUC, minus the "
        "pre-trained model's; choosing it needs membership labels, so it bounds the worst case and is no attack",
    ] + defense_lines(results)


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    render = lambda r: "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()  # noqa: E731
    return [render(header), "-" * len(render(header))] + [render(r) for r in rows]


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def format_table(results: dict) -> str:
    """The table as aligned plain text, for the terminal, then every attack side by side."""
    lines = _aligned(*table_rows(results)) + _footer(results)
    if not results["config"]["attack"]["mia"]:
        return "\n".join(lines)
    return "\n".join(lines + ["", "every membership inference attack, paired vs pre-trained:"] + _aligned(*attack_rows(results)))


def format_markdown(results: dict) -> str:
    """The table as Markdown, for reports."""
    lines = _markdown(*table_rows(results)) + [""] + _footer(results)
    if not results["config"]["attack"]["mia"]:
        return "\n".join(lines) + "\n"
    lines += ["", "## Every membership inference attack (paired change vs the pre-trained model)", ""] + _markdown(*attack_rows(results))
    return "\n".join(lines) + "\n"


def write_results(config: Config, results: dict) -> Path:
    """Write results.json, table.txt, table.md and the resolved config into the run folder."""
    run_dir = run_folder(config)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    (run_dir / "config.toml").write_text(config.to_toml())
    (run_dir / "table.txt").write_text(config.to_toml() + "\n" + format_table(results) + "\n")
    (run_dir / "table.md").write_text(f"# S2L table ({config.name} profile)\n\n" + format_markdown(results))
    return run_dir

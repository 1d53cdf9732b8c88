"""The defense table of docs/defenses.md and docs/gates.md from a matrix run's results.json, as Markdown.

    .venv/bin/python docs/calibration/matrix_table.py runs/<profile>-matrix-<hash> [configs/standard.toml]

With a config, the gates are judged with its [gates] (mode, checks, thresholds) instead of
those the matrix ran with; the measurements are the same either way.

Per defense (pooled over the attacked domains, 95% intervals): the released model's own
leakage (SecMI, PIA and CLiD AUC, extraction above the held-out non-member null), S2L's paired
change with End-to-End and LoRA on the SP set (SecMI; CLiD with End-to-End; extraction above the null), the
oracle row's PIA change (End-to-End on the real members), utility, and the gate verdicts
of the matrix's [gates] as pass/fail/error/skip.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from pathlib import Path

from s2l_guard.config import load_config
from s2l_guard.formatting import format_interval
from s2l_guard.gates import evaluate
from s2l_guard.results import Status, gate_cells
from s2l_guard.runner.matrix import config_of, load_matrix
from s2l_guard.runner.plan import plan


def main(folder: str, gates_config: str | None = None) -> None:
    results = load_matrix(Path(folder))
    config = config_of(results)
    if gates_config:
        gates = dataclasses.asdict(load_config(gates_config).gates)
        config = config.replace(gates={k: list(v) if isinstance(v, tuple) else v for k, v in gates.items()})
    seed = results["seeds"][0]
    cells = {(c.defense, c.attack, c.measure): c for c in gate_cells(results) if c.pooled and c.seed == seed}
    verdicts = evaluate(results, config.gates, plan(config, results["defenses"]))
    counts = {d: Counter(v.outcome for v in verdicts if v.cell_id.startswith(f"{d}-")) for d in results["defenses"]}

    def metric(defense: str, attack: str, measure: str, key: str, signed: bool = False, digits: int = 3) -> str:
        cell = cells.get((defense, attack, measure))
        if cell is None or cell.status != Status.OK:
            return cell.status.value if cell else "-"
        entry = cell.metric(key)
        if not entry:
            return "-"
        return format_interval(entry.get("value", entry.get("delta")), entry.get("ci95"), signed=signed, digits=digits)

    header = ["defense", "threat model", "epsilon", "released SecMI AUC", "released PIA AUC", "released CLiD AUC", "released extraction above null",
              "end2end dAUC SecMI", "lora dAUC SecMI", "end2end dAUC CLiD", "end2end d above null", "oracle dAUC PIA", "cond. accuracy",
              "gates pass/fail/error/skip"]  # fmt: skip
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for defense in results["defenses"]:
        table = results["tables"].get(f"{defense}/{seed}", {})
        privacy = table.get("report", {}).get("pretraining", {}).get("privacy")
        c = counts[defense]
        row = [defense, table.get("threat_model") or "-", f"{privacy['epsilon']:.2f}" if privacy else "-",
               metric(defense, "pretrained", "secmi", "auc"), metric(defense, "pretrained", "pia", "auc"), metric(defense, "pretrained", "clid", "auc"),
               metric(defense, "pretrained", "extraction", "extracted_above_null", signed=True, digits=1),
               metric(defense, "end2end", "secmi", "auc_amplification", signed=True), metric(defense, "lora", "secmi", "auc_amplification", signed=True),
               metric(defense, "end2end", "clid", "auc_amplification", signed=True),
               metric(defense, "end2end", "extraction", "extraction_amplification", signed=True, digits=1),
               metric(defense, "end2end-members", "pia", "auc_amplification", signed=True),
               metric(defense, "-", "utility", "conditional_accuracy"),
               f"{c['pass']}/{c['fail']}/{c['error']}/{c['skip']}"]  # fmt: skip
        print("| " + " | ".join(row) + " |")
    total = Counter(v.outcome for v in verdicts)
    print(
        f"\nall gates ({config.gates.mode} mode): {total['pass']} pass, {total['fail']} fail, {total['error']} error, {total['skip']} skip ({len(verdicts)})"
    )
    by_check = {check: Counter(v.outcome for v in verdicts if v.check == check) for check in config.gates.checks}
    for check, c in by_check.items():
        print(f"  {check}: {c['pass']} pass, {c['fail']} fail, {c['error']} error, {c['skip']} skip")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:])

"""The three-regime table of docs/calibration (issue 12) from the runs' results.json, as Markdown.

    .venv/bin/python docs/calibration/regimes.py A=runs/<a>/results.json B=runs/<b>/results.json ...

Per regime and row: SecMI, PIA and loss AUC of the pre-trained model and their paired change
after fine-tuning (95% intervals), the change against the same method's real-OoD and
self-generated-OoD controls (SecMI), extraction above the held-out non-member null (summed
over domains) and its change, and the decision rule's verdict for every SP row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ci(entry: dict | None, digits: int = 3) -> str:
    if not entry:
        return ""
    f = f"{{:+.{digits}f}}"
    return f"{f.format(entry['delta'])} [{f.format(entry['ci95'][0])}, {f.format(entry['ci95'][1])}]"


def regime_rows(label: str, results: dict) -> tuple[list[list[str]], list[str]]:
    table = {row["row"]: row for row in results["table"]}
    out, verdicts = [], []
    pre = table["pretrained"]
    ext = pre["extraction"]
    out.append([label, "pretrained", "-"] + [f"{pre['mia'][m]['roc']['auc']['value']:.3f}" for m in ("secmi", "pia", "loss")]
               + ["", "", f"{sum(ext['extracted_per_domain'])} / {sum(ext['nonmembers_matched_per_domain'])}, "
                  f"{ext['above_null']['excess']:+.1f} [{ext['above_null']['ci95'][0]:+.1f}, {ext['above_null']['ci95'][1]:+.1f}]", "", ""])  # fmt: skip
    for name, row in table.items():
        if name == "pretrained" or row.get("status") != "ok":
            if name != "pretrained":
                out.append([label, name, row.get("data") or "-", row.get("status", "")] + [""] * 7)
            continue
        if "draws" in row:  # a Gaussian mean over draws
            deltas = [f"{row['mia'][m]['auc_delta_mean']:+.3f} (mean)" for m in ("secmi", "pia", "loss")]
            out.append([label, name, "-"] + deltas + ["", "", f"{row['extraction']['extracted_per_domain_mean']:.1f} / domain", "", ""])
            continue
        if name.startswith("gaussian-"):
            continue  # single draws: see their mean row
        mia = row["mia"]
        e = row["extraction"]
        out.append([label, name, row["data"]] + [ci(mia[m].get("auc_delta")) for m in ("secmi", "pia", "loss")]
                   + [ci(mia["secmi"].get("auc_delta_vs_ood_control")), ci(mia["secmi"].get("auc_delta_vs_generated_ood_control")),
                      f"{sum(e['extracted_per_domain'])} / {sum(e['nonmembers_matched_per_domain'])}, "
                      f"{e['above_null']['excess']:+.1f}", ci(e.get("above_null_delta_vs_pretrained"), 1), best(row)])  # fmt: skip
        if row["data"] == "SP":
            verdicts.append(f"{label} {name}: " + rule(row, table))
    return out, verdicts


def best(row: dict) -> str:
    b = row.get("best_checkpoint")
    return f"{b['delta']:+.3f} @ {b['step']}" if b else ""


def rule(row: dict, table: dict) -> str:
    """The decision rule: SecMI AUC or extraction above the null rises against the pre-trained model
    (paired 95% interval above 0) with a point estimate above the same method's real-OoD control."""
    control = table.get(f"{row['row']}-ood") or table.get("end2end-ood")
    reasons = []
    for what, mine, theirs in (
        ("SecMI dAUC", row["mia"]["secmi"].get("auc_delta"), control and control["mia"]["secmi"].get("auc_delta")),
        ("extraction above null", row["extraction"].get("above_null_delta_vs_pretrained"),
         control and control["extraction"].get("above_null_delta_vs_pretrained")),
    ):  # fmt: skip
        if mine is None or theirs is None:
            continue
        met = mine["ci95"][0] > 0 and mine["delta"] > theirs["delta"]
        reasons.append(f"{what} {mine['delta']:+.3f} (low {mine['ci95'][0]:+.3f}) vs control {theirs['delta']:+.3f}: {'MEETS' if met else 'no'}")
    return "; ".join(reasons)


def main(args: list[str]) -> None:
    header = ["regime", "row", "data", "SecMI (dAUC)", "PIA (dAUC)", "loss (dAUC)", "SecMI vs OoD", "SecMI vs OoD-gen",
              "members / non-members matched, above null", "d above null", "best step (oracle)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts = []
    for arg in args:
        label, _, path = arg.partition("=")
        rows, v = regime_rows(label, json.loads(Path(path).read_text()))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        verdicts += v
    print("\n".join(lines))
    print("\nDecision rule, per SP row:\n" + "\n".join(f"- {v}" for v in verdicts))


if __name__ == "__main__":
    main(sys.argv[1:])

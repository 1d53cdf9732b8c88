"""How small an amplification can an S2L table resolve? A power calculation from its own numbers.

    .venv/bin/python benchmarks/resolution.py runs/<profile>-<hash>/results.json [more results.json ...]

For every pooled SP row with a paired change against the pre-trained model, the paired bootstrap's
standard error (from the measured per-sample scores) gives the minimum detectable change at a
two-sided 5% level with 80% power (``s2l_guard.stats.minimum_detectable_delta``), now and with
every sample count (members and non-members per domain, candidates) multiplied by 2 and 4.
Extraction is in members above the null, summed over domains, per today's candidate count
(with k times the candidates, divide the count by k). The last lines say whether TPR at
1% FPR is resolvable: it needs 100 test non-members after the calibration split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from s2l_guard.stats import minimum_detectable_delta

SCALES = (1, 2, 4)


def rows(results: dict) -> list[tuple[str, str, float, list[float]]]:
    """(row, measure, standard error, [MDE at each scale]) for each pooled SP row and measure:
    the rows whose amplification S2L is judged by."""
    out = []
    for row in results["table"]:
        if row.get("status") != "ok" or row.get("data") != "SP":
            continue
        for mia, entry in row["mia"].items():
            delta = entry.get("auc_delta")
            if delta:
                out.append((row["row"], f"{mia} dAUC", delta["se"], [minimum_detectable_delta(delta["se"], scale=k) for k in SCALES]))
        moved = row["extraction"].get("above_null_delta_vs_pretrained")
        if moved and moved["se"] > 0:  # members per today's candidate count; se 0: nothing matched, nothing to size a test from
            out.append((row["row"], "extracted above null", moved["se"], [minimum_detectable_delta(moved["se"], scale=k) for k in SCALES]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args()
    for path in args.results:
        results = json.loads(path.read_text())
        domains = results["domains"]
        members = sum(d["members"] for d in domains.values())
        nonmembers = sum(d["nonmembers"] for d in domains.values())
        print(f"{path}: {len(domains)} domains, {members} members and {nonmembers} non-members pooled")
        print(f"{'row':<24} {'measure':<22} {'se':>7}  " + "  ".join(f"MDE x{k}".rjust(9) for k in SCALES))
        found = rows(results)
        for row, measure, se, mdes in found:
            print(f"{row:<24} {measure:<22} {se:7.4f}  " + "  ".join(f"{m:9.4f}" for m in mdes))
        for measure in sorted({m for _, m, _, _ in found}):
            ses = [se for _, m, se, _ in found if m == measure]
            median = float(np.median(ses))
            print(
                f"median over SP rows, {measure}: se {median:.4f}, MDE "
                + ", ".join(f"x{k} {minimum_detectable_delta(median, scale=k):.4f}" for k in SCALES)
            )
        share = results["config"]["attack"]["calibration_share"]
        test = round(nonmembers * (1 - share))
        need = int(np.ceil(100 / (1 - share) / len(domains)))
        print(f"TPR at 1% FPR: {test} test non-members after the {share:g} calibration split "
              f"({'resolvable' if test >= 100 else 'unresolvable'}; needs >= 100, i.e. >= {need} non-members per domain)\n")  # fmt: skip


if __name__ == "__main__":
    main()

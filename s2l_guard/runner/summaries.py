"""From cached cells to the numbers a table prints: per-domain summaries, pooled rows, controls.

Amplification = after minus before on the *same* samples: paired bootstrap and
DeLong's test for AUC, the calibrated TPR at 1% FPR paired over test members, and
extraction above the held-out non-members' null compared at equal candidate counts.
A domain's row and a pooled row write these under the same keys (:func:`mia_deltas`,
``delta_total_vs_pretrained``, ``above_null_delta_vs_pretrained``), so one reader serves both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from s2l_guard.audit import epsilon_lower_bound
from s2l_guard.config import Config
from s2l_guard.metrics import auc, metrics_to_dict, roc_metrics, threshold_protocol
from s2l_guard.results import Status, TableCell
from s2l_guard.stats import (
    calibrated_tpr_delta,
    candidate_shares,
    delong_test,
    distinct_extracted,
    excess_extraction,
    extraction_delta,
    paired_bootstrap_delta,
    share_delta,
    share_sum_interval,
)

from .plan import DataKind, Row, row_label
from .settings import shaker_settings

FPRS = (0.01, 0.001)


CONTROLS = {  # key in results.json -> the data of the control row an SP row is compared with
    "vs_ood_control": DataKind.OOD,  # real images of a public domain: fine-tuning as such
    "vs_generated_ood_control": DataKind.OOD_GEN,  # the model's own images of a public domain: self-generated data as such
}


def controls_for(cells: dict[str, TableCell], cell: TableCell) -> dict[str, TableCell]:
    """The controls an SP row is compared with: the same method on that data, else End-to-End on it.

    Only controls that ran are returned; non-SP rows have none.
    """
    if cell.data != DataKind.SP:
        return {}
    found = {}
    for key, kind in CONTROLS.items():
        control = cells.get(row_label(cell.shaker, kind)) or cells.get(row_label("end2end", kind))
        if control is not None and control.ok:
            found[key] = control
    return found


def _pooled_scores(cells: list[TableCell], mia: str) -> tuple[np.ndarray, np.ndarray]:
    """Members' and non-members' scores of several domains' cells, concatenated (the domains are disjoint)."""
    return tuple(np.concatenate([c.scores(mia)[i] for c in cells]) for i in (0, 1))


def roc_points(members: np.ndarray, nonmembers: np.ndarray) -> dict[str, list[float]]:
    """The ROC curve's corners (scikit-learn), for plots in reports."""
    fpr, tpr, _ = roc_curve(np.r_[np.ones(len(members)), np.zeros(len(nonmembers))], np.r_[members, nonmembers])
    return {"fpr": np.round(fpr, 5).tolist(), "tpr": np.round(tpr, 5).tolist()}


def _calibrated(protocol: dict) -> dict:
    """The TPR at 1% FPR an attacker reaches on new samples: the threshold fitted on the calibration
    split's non-members, measured on the disjoint test split (:func:`threshold_protocol`)."""
    fitted = protocol["fit_on_calibration"][str(FPRS[0])]
    return {"value": fitted["tpr"]["value"], "ci95": fitted["tpr"]["ci95"], "fpr_on_test": fitted["fpr"]["value"],
            "resolvable": fitted["resolvable"], "test_members": protocol["split"]["test"]["members"],
            "test_nonmembers": protocol["split"]["test"]["nonmembers"], "threshold": fitted["threshold"]}  # fmt: skip


def mia_deltas(bm: np.ndarray, bn: np.ndarray, m: np.ndarray, n: np.ndarray, config: Config, seed: int) -> dict:
    """After minus before on the same members and non-members, under the keys a domain's row and a
    pooled row share: the AUC (paired bootstrap), the calibrated TPR at 1% FPR, and the in-sample TPR."""
    b, share = config.attack.bootstrap, config.attack.calibration_share
    return {
        "auc_delta": paired_bootstrap_delta(bm, bn, m, n, statistic="auc", resamples=b, seed=seed).to_dict(),
        "tpr_delta": calibrated_tpr_delta(bm, bn, m, n, fpr=FPRS[0], calibration_share=share, resamples=b, seed=seed),
        "tpr_delta_in_sample": paired_bootstrap_delta(bm, bn, m, n, statistic=f"tpr@{FPRS[0]}", resamples=b, seed=seed).to_dict(),
    }


def summarize_mia(cell: TableCell, base: TableCell, config: Config, seed: int, controls: dict[str, TableCell]) -> dict:
    out = {}
    b = config.attack.bootstrap
    for name in cell.mia:
        (m, n), (bm, bn) = cell.scores(name), base.scores(name)
        entry = {
            "roc": metrics_to_dict(roc_metrics(m, n, fprs=FPRS, resamples=b, seed=seed)),
            "curve": roc_points(m, n),
            "thresholds": metrics_to_dict(threshold_protocol(m, n, fprs=FPRS, calibration_share=config.attack.calibration_share, seed=seed, resamples=b)),
        }  # fmt: skip
        entry["tpr_calibrated"] = _calibrated(entry["thresholds"])
        if cell is not base:
            entry |= mia_deltas(bm, bn, m, n, config, seed)
            entry["auc_delta_delong"] = delong_test(bm, bn, m, n).to_dict()
        for key, control in controls.items():
            entry[key] = {"auc_delong": delong_test(*control.scores(name), m, n).to_dict()}
        out[name] = entry
    return out


def summarize_cell(cell: TableCell, base: TableCell, config: Config, seed: int, controls: dict[str, TableCell]) -> dict:
    """A domain's row for results.json: the cell's own statistics and its changes vs the pre-trained model and the controls."""
    d = cell.to_dict()
    if not cell.ok or not base.ok:
        return {k: d[k] for k in ("row", "shaker", "data", "variant", "status", "reason", "evidence", "images")}
    summary = {k: d[k] for k in ("row", "shaker", "data", "variant", "sigma", "prompt", "trainable_parameters", "final_loss",
                                 "seconds", "cached", "trajectory", "evidence", "images")}  # fmt: skip
    summary["status"] = "ok"
    summary["mia"] = summarize_mia(cell, base, config, seed, controls)
    ext = dict(cell.extraction["summary"], extracted_files=cell.extraction["extracted"])
    b = config.attack.bootstrap
    hits = cell.extraction["hits"]
    ext["above_null"] = excess_extraction(hits, cell.extraction["null_hits"], null_weight=cell.extraction["null_weight"], resamples=b, seed=seed)
    if cell is not base:
        ext["delta_total_vs_pretrained"] = extraction_delta(base.extraction["hits"], hits, resamples=b, seed=seed).to_dict()
        ext["above_null_delta_vs_pretrained"] = share_delta(_null_shares([base]), _null_shares([cell]), statistic="extracted_above_null",
                                                      resamples=b, seed=seed).to_dict()  # fmt: skip
    for key, control in controls.items():
        ext[key] = extraction_delta(control.extraction["hits"], hits, resamples=b, seed=seed).to_dict()
    summary["extraction"] = ext
    return summary


def pooled(cells_by_domain: dict[str, dict[str, TableCell]], row: str, base_row: str, config: Config, seed: int) -> dict:
    """One table row over all domains: scores pooled for MIA, extractions averaged per domain.

    An SP row is also compared with its out-of-domain controls (see :func:`controls_for`),
    where every domain has them. A domain whose cell (or baseline) failed fails the pooled row
    too: pooling the others would let a crash drop a domain from the gates unseen.
    """
    usable = [cells for cells in cells_by_domain.values() if cells[row].ok and cells[base_row].ok]
    refused = sorted(name for name, cells in cells_by_domain.items() if cells[row].status == Status.REFUSED)
    crashed = {name: cells[r].reason or "no reason given" for name, cells in cells_by_domain.items()
               for r in (base_row, row) if cells[r].status == Status.FAILED}  # fmt: skip
    if crashed and usable:
        reasons = [f"{name} failed ({reason})" for name, reason in sorted(crashed.items())]
        return {"row": row, "status": "failed", "reasons": reasons, "refused_domains": refused}
    if not usable:
        statuses = sorted({c[row].status.value for c in cells_by_domain.values()})
        status = next((s for s in ("failed", "refused") if s in statuses), "not-run")
        reasons = sorted({c[row].reason for c in cells_by_domain.values() if c[row].reason})
        return {"row": row, "status": status, "reasons": reasons, "refused_domains": refused}
    cells = [c[row] for c in usable]
    bases = [c[base_row] for c in usable]
    found = [controls_for(c, c[row]) for c in usable]
    controls = {key: [f[key] for f in found] for key in CONTROLS if all(key in f for f in found)}
    data = cells[0].data + (f"+{cells[0].variant}" if cells[0].variant else "")
    out: dict[str, Any] = {"row": row, "status": "ok", "domains": len(cells), "data": data, "refused_domains": refused,
                           "trainable_parameters": cells[0].trainable_parameters, "mia": {},
                           "controls": {key: control_cells[0].row for key, control_cells in controls.items()}}  # fmt: skip
    b = config.attack.bootstrap
    for mia in config.attack.mia:
        (m, n), (bm, bn) = _pooled_scores(cells, mia), _pooled_scores(bases, mia)
        share = config.attack.calibration_share
        entry = {
            "roc": metrics_to_dict(roc_metrics(m, n, fprs=FPRS, resamples=b, seed=seed)),
            "tpr_calibrated": _calibrated(metrics_to_dict(threshold_protocol(m, n, fprs=FPRS[:1], calibration_share=share, seed=seed, resamples=b))),
        }
        if row != base_row:
            entry |= mia_deltas(bm, bn, m, n, config, seed)
        for key, control_cells in controls.items():
            cm, cn = _pooled_scores(control_cells, mia)
            entry[f"auc_delta_{key}"] = paired_bootstrap_delta(cm, cn, m, n, statistic="auc", resamples=b, seed=seed).to_dict()
        out["mia"][mia] = entry
    if config.attack.mia and all(c.trajectory for c in cells):
        steps = shaker_settings(config, cells[0].shaker).steps
        out["best_checkpoint"] = best_checkpoint(cells, bases, config.attack.mia[0], steps)
    counts = [distinct_extracted(c.extraction["hits"]) for c in cells]
    null_counts = [distinct_extracted(c.extraction["null_hits"]) for c in cells]
    excess = _null_shares(cells)
    flagged = sum(sum(c.extraction["flagged"]) for c in cells)
    true_flagged = sum(sum(1 for h, f in zip(c.extraction["any_hits"], c.extraction["flagged"]) if f and h >= 0) for c in cells)
    out["extraction"] = {
        "extracted_per_domain_mean": float(np.mean(counts)),
        "extracted_per_domain": counts,
        "nonmembers_matched_per_domain": null_counts,
        "above_null": {
            "excess": float(excess.sum()),
            "ci95": share_sum_interval(excess, resamples=b, seed=seed),
            "candidates": len(excess),
            "method": "members minus non-members matched by the same candidates, summed over domains; bootstrap of candidate shares",
        },
        "candidates_per_domain": cells[0].extraction["summary"]["candidates"],
        "withheld": sum(c.extraction.get("withheld", 0) for c in cells),  # by a generate API
        "precision": true_flagged / flagged if flagged else None,
    }
    if row != base_row:  # domains' members are distinct images, so their hits pool into one count
        pool = lambda cs: [h for c in cs for h in c.extraction["hits"]]  # noqa: E731
        out["extraction"]["delta_total_vs_pretrained"] = extraction_delta(pool(bases), pool(cells), resamples=b, seed=seed).to_dict()
        out["extraction"]["above_null_delta_vs_pretrained"] = share_delta(_null_shares(bases), excess, statistic="extracted_above_null",
                                                                          resamples=b, seed=seed).to_dict()  # fmt: skip
    return out


def _null_shares(cells: list[TableCell]) -> np.ndarray:
    """Every candidate's share of the extraction above the null, over the cells' domains (whose
    members and non-members are disjoint, so the shares pool)."""
    return np.concatenate([candidate_shares(c.extraction["hits"], c.extraction["null_hits"], null_weight=c.extraction["null_weight"])
                           for c in cells])  # fmt: skip


def best_checkpoint(cells: list[TableCell], bases: list[TableCell], mia: str, final_step: int) -> dict:
    """The fine-tuning step with the highest mean per-domain AUC, the final step included.

    A worst-case bound, not an attack: picking the step needs the membership labels
    the attacker does not have. Compared with the pre-trained model's mean per-domain AUC.
    """
    by_step: dict[int, list[float]] = {}
    for cell in cells:
        for point in cell.trajectory:
            by_step.setdefault(point["step"], []).append(point["auc"])
    curve = {step: float(np.mean(aucs)) for step, aucs in by_step.items() if len(aucs) == len(cells)}
    curve[final_step] = float(np.mean([auc(*c.scores(mia)) for c in cells]))
    step = max(curve, key=lambda s: (curve[s], -s))
    pretrained = float(np.mean([auc(*b.scores(mia)) for b in bases]))
    return {"mia": mia, "step": step, "mean_domain_auc": curve[step], "pretrained_mean_domain_auc": pretrained,
            "delta": curve[step] - pretrained, "curve": [{"step": s, "mean_domain_auc": a} for s, a in sorted(curve.items())],
            "uses_membership_labels": True}  # fmt: skip


def gaussian_means(table: list[dict], rows: list[Row], config: Config) -> list[dict]:
    """Per sigma, the mean over Gaussian draws: one draw is too noisy to read (the paper's rise
    at s = 8e-4 needs several draws to tell from chance)."""
    by_label = {entry["row"]: entry for entry in table}
    out = []
    for sigma in config.attack.gaussian_sigmas:
        draws = [by_label[r.label] for r in rows if r.sigma == sigma and by_label[r.label]["status"] == "ok"]
        if not draws:
            continue
        entry: dict[str, Any] = {"row": f"gaussian-{sigma:g}-mean", "status": "ok", "draws": len(draws), "sigma": sigma,
                                 "trainable_parameters": draws[0]["trainable_parameters"], "mia": {}}  # fmt: skip
        for mia in config.attack.mia:
            aucs = [d["mia"][mia]["roc"]["auc"]["value"] for d in draws]
            deltas = [d["mia"][mia]["auc_delta"]["delta"] for d in draws]
            entry["mia"][mia] = {"auc_mean": float(np.mean(aucs)), "auc_draws": aucs,
                                 "auc_delta_mean": float(np.mean(deltas)), "auc_delta_draws": deltas}  # fmt: skip
        counts = [d["extraction"]["extracted_per_domain_mean"] for d in draws]
        entry["extraction"] = {"extracted_per_domain_mean": float(np.mean(counts)), "draws": counts}
        out.append(entry)
    return out


def empirical_epsilon(cells_by_domain: dict[str, dict[str, TableCell]], config: Config, delta: float) -> dict:
    """Per MIA, the lower bound on the deployed model's epsilon its pre-trained row's scores imply
    (:func:`s2l_guard.audit.epsilon_lower_bound`), pooled over the domains whose row ran."""
    bases = [cells["pretrained"] for cells in cells_by_domain.values() if cells["pretrained"].ok]
    out = {}
    for mia in config.attack.mia if bases else ():
        members, nonmembers = _pooled_scores(bases, mia)
        out[mia] = epsilon_lower_bound(members, nonmembers, delta=delta, calibration_share=config.attack.calibration_share, seed=config.run.seed)
    return out

"""What a defense did, in words: the lines under an S2L table and the one-line-per-defense summary."""

from __future__ import annotations

from typing import Any

from s2l_guard.formatting import format_entry


def privacy_line(defense: dict) -> str | None:
    privacy = defense.get("pretraining", {}).get("privacy")
    if not privacy:
        return None
    return (f"epsilon {privacy['epsilon']:.2f} at delta {privacy['delta']:.1e} ({privacy['accountant']} accountant: noise multiplier "
            f"{privacy['noise_multiplier']:.3f}, sample rate {privacy['sample_rate']:.4f}, {privacy['steps']} steps)")  # fmt: skip


def utility_line(utility: dict) -> str:
    if utility.get("status") != "ok":
        return f"utility: {utility.get('status')} ({utility.get('reason', '')})"
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return (f"utility: conditional accuracy {fmt(utility['conditional_accuracy_mean'], '.3f')}, Frechet distance "
            f"{fmt(utility['frechet_distance'], '.2f')}, served {utility['served_share']:.1%} of generations, held-out denoising "
            f"loss {fmt(utility['heldout_denoising_loss'], '.4f')} (members {fmt(utility['member_denoising_loss'], '.4f')})")  # fmt: skip


def defense_lines(results: dict) -> list[str]:
    """The defense, its threat model and what it reported, for the table's footer."""
    d, lines = results.get("defense"), []
    if not d:
        return lines
    head = f"defense: {d['name']} (acts on {', '.join(d['points']) or 'nothing'}), threat model {d['threat_model']}"
    if d.get("unavailable_mia"):
        head += f"; not run: {', '.join(d['unavailable_mia'])} (they need the weights)"
    lines.append(head)
    if privacy_line(d):
        lines.append(privacy_line(d))
    if d.get("empirical_epsilon"):
        bounds = d["empirical_epsilon"]
        first = next(iter(bounds.values()))
        lines.append("empirical epsilon, lower bound from the pre-trained model's MIA scores "
                     f"({first['confidence']:.0%} confidence, {first['test_members']} + {first['test_nonmembers']} test samples): "
                     + ", ".join(f"{mia} {b['epsilon']:.2f}" for mia, b in bounds.items())
                     + "; a member repeated k times is protected only as a group of k rows (k x epsilon)")  # fmt: skip
    if "dedup" in d.get("pretraining", {}):
        x = d["pretraining"]["dedup"]
        lines.append(f"dedup: kept {x['kept']} of {x['distinct_images']} distinct images ({x['training_rows_before']} rows before), "
                     f"dropped {x['dropped_members']} members as near-duplicates within {x['radius']}")  # fmt: skip
    f = d.get("filter")
    if f:
        found = ", ".join(f"{k} ({v['size']} images) {format_entry(v)}" for k, v in f["detection"].items())
        frr = ", ".join(f"{size} images {format_entry(v)}" + (f", {v['across_splits']['mean']:.3f} over {v['across_splits']['splits']} re-splits "
                        f"(95% of splits {v['across_splits']['range95'][0]:.3f}-{v['across_splits']['range95'][1]:.3f})" if "across_splits" in v else "")
                        + f" (target {v['target']})" for size, v in f["false_rejection_heldout"].items())  # fmt: skip
        lines.append(f"fine-tune filter detection: {found}; false rejection on held-out benign sets: {frr}")
    withheld = sum(row.get("extraction", {}).get("withheld", 0) for row in results["table"] if row.get("status") == "ok")
    if withheld:
        lines.append(f"generate API withheld {withheld} extraction candidates across the table (counted as no extraction)")
    if "utility" in results:
        lines.append(utility_line(results["utility"]))
    return lines


def _headline(results: dict) -> dict[str, Any]:
    """Pre-trained leakage and the largest S2L amplification in the table (primary MIA)."""
    mias = results["config"]["attack"]["mia"]
    primary = mias[0] if mias else None
    table = {row["row"]: row for row in results["table"]}
    pre = table.get("pretrained", {})
    out: dict[str, Any] = {"primary": primary, "pre_auc": None, "pre_extracted": None, "best": None, "refused": [], "after_extracted": None}
    if pre.get("status") == "ok":
        out["pre_auc"] = pre["mia"][primary]["roc"]["auc"] if primary else None
        out["pre_extracted"] = pre["extraction"]["extracted_per_domain_mean"]
    sp_rows = [r for r in results["table"] if str(r.get("data", "")).startswith("SP") or r.get("status") == "refused"]
    out["refused"] = [r["row"] for r in sp_rows if r.get("status") == "refused"]
    ok = [r for r in sp_rows if r.get("status") == "ok"]
    if ok and primary:
        best = max(ok, key=lambda r: r["mia"][primary]["auc_delta"]["delta"])
        out["best"] = (best["row"], best["mia"][primary]["auc_delta"])
    if ok:
        out["after_extracted"] = max(r["extraction"]["extracted_per_domain_mean"] for r in ok)
    return out


def format_defense_summary(all_results: list[dict]) -> str:
    """One line per defense: leakage before and after S2L, privacy, utility and wall time."""
    header = ["defense", "threat model", "epsilon", "AUC pre-trained", "largest S2L dAUC [95% CI]", "extracted pre / max after",
              "refused requests", "cond. acc.", "FD", "held-out loss", "wall s"]  # fmt: skip
    rows = []
    for results in all_results:
        d, u, h = results["defense"], results.get("utility", {}), _headline(results)
        privacy = d.get("pretraining", {}).get("privacy")
        best = f"{h['best'][0]}: {format_entry(h['best'][1], signed=True)}" if h["best"] else "-"
        extracted = f"{h['pre_extracted']:.1f} / {h['after_extracted']:.1f}" if h["after_extracted"] is not None else (
            f"{h['pre_extracted']:.1f} / -" if h["pre_extracted"] is not None else "-")  # fmt: skip
        ok = u.get("status") == "ok"
        rows.append([d["name"], d["threat_model"], f"{privacy['epsilon']:.2f}" if privacy else "-",
                     f"{h['primary']} {format_entry(h['pre_auc'])}" if h["pre_auc"] else "-", best, extracted,
                     str(len(h["refused"])), f"{u['conditional_accuracy_mean']:.3f}" if ok and u["conditional_accuracy_mean"] is not None else "-",
                     f"{u['frechet_distance']:.2f}" if ok and u["frechet_distance"] is not None else "-",
                     f"{u['heldout_denoising_loss']:.4f}" if ok and u["heldout_denoising_loss"] is not None else "-",
                     f"{results['wall_seconds']:.0f}"])  # fmt: skip
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    render = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    notes = ["largest S2L dAUC: the SP row with the largest paired AUC change vs the pre-trained model (primary MIA); "
             "picking the largest of several rows is itself optimistic for the attacker",
             "wall s: this run's wall time; cached cells (shared with the undefended run under open-weights) cost ~0"]  # fmt: skip
    return "\n".join([render(header), "-" * len(render(header))] + [render(r) for r in rows] + notes)

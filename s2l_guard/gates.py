"""Release gates: verdicts on matrix cells against the thresholds of [gates].

A gate compares one cell's measurement with its threshold: under ``compare =
"interval"`` the unfavourable end of the 95% interval (the upper end of a leak, the
lower end of utility), under ``"point"`` the estimate. Leakage gates rest on a
positive control, pooled over domains, chosen by ``[gates] mode``:

- ``compare`` (does a defense lower leakage the undefended model shows?): the same
  attack must raise the undefended model's (defense ``none``) leakage;
- ``release`` (is the audited model safe, and could the instrument have seen it if not?):
  the oracle row - the same method fine-tuned on the real members - must raise the
  audited model's leakage. Oracle rows are then the control, not gated themselves.

Baseline gates judge the model as released (the pre-trained row); their control is the
oracle row (of the undefended model under ``compare``). When the control does not leak,
the gate cannot tell a safe model from an insensitive test: the verdict is an error,
never a pass. Under several seeds ([matrix] seeds) a gate that passes under one seed but not
under another is ``unstable``: its passes do not stand (a release cannot rest on the seed it
happened to draw). The gate suite (``pytest suites/``) and the reports share these functions.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, replace

from .metrics import rate_with_interval
from .results import POOLED, GateCell, Status, cells_by_key
from .runner.plan import PlannedCell

MIA_CHECKS = ("auc_amplification", "tpr_at_1pct_fpr", "baseline_tpr_at_1pct_fpr")
BASELINE = "baseline_"  # checks of the model as released: the pre-trained row
# the metric each gate reads, and the [gates] key holding its threshold
THRESHOLDS = {"auc_amplification": "max_auc_amplification", "tpr_at_1pct_fpr": "max_tpr_at_1pct_fpr",
              "extracted": "max_extracted", "utility": "min_utility",
              "baseline_tpr_at_1pct_fpr": "max_baseline_tpr_at_1pct_fpr", "baseline_extracted": "max_baseline_extracted"}  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """A gate's outcome: pass, fail, skip (the cell did not run), error (the control does not leak)
    or unstable (it passes under this seed but not under another of the matrix's seeds)."""

    check: str
    cell_id: str
    outcome: str
    message: str
    value: float | None = None
    bound: float | None = None  # what was compared with the threshold
    threshold: float | None = None


def applies(check: str, cell: PlannedCell, gates) -> bool:
    """Whether ``check`` gates ``cell``: baseline gates judge the pre-trained row, the other
    leakage gates the shaken rows (but the oracle rows under ``mode = "release"``, where they
    are the control), on single domains, the pool, or both."""
    if check == "utility":
        return cell.measure == "utility"
    if cell.measure == "utility" or (cell.attack == "pretrained") != check.startswith(BASELINE):
        return False
    if gates.mode == "release" and cell.attack == cell.oracle:
        return False
    if (check in MIA_CHECKS) == (cell.measure == "extraction"):
        return False
    return gates.domains == "both" or (cell.domain == POOLED) == (gates.domains == "pooled")


def gate_plan(planned: list[PlannedCell], gates, check: str) -> list[PlannedCell]:
    """The planned cells ``check`` gates (none when [gates] checks leaves it out)."""
    if check not in gates.checks:
        return []
    return [c for c in planned if applies(check, c, gates)]


def _fmt(value: float, ci: list[float] | None, signed: bool) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f.format(value) + (f" [95% CI {f.format(ci[0])}, {f.format(ci[1])}]" if ci else "")


def _samples(cell: GateCell) -> str:
    s = cell.samples or {}
    if "members" in s:
        return f"{s['members']} members vs {s['nonmembers']} non-members, {s['bootstrap']} bootstrap resamples"
    if "candidates" in s:
        return f"{s['candidates']} generated candidates"
    return f"{s.get('generations', '?')} generations"


def verdict(check: str, cell: GateCell | None, gates) -> Verdict:
    """One gate on one measured cell (``None``: the cell is missing from results.json)."""
    threshold = getattr(gates, THRESHOLDS[check])
    if cell is None:
        return Verdict(check, "?", "fail", "the cell is missing from results.json; rerun the matrix without --s2l-reuse")
    cid = cell.id
    where = f"[gates] {THRESHOLDS[check]} = {threshold:g}, compare = {gates.compare}"
    if cell.status == Status.NOT_RUN:
        return Verdict(check, cid, "skip", f"{cid} did not run: {cell.reason}")
    if cell.status == Status.FAILED:
        return Verdict(check, cid, "fail", f"{cid} failed: {cell.reason}")
    if cell.status == Status.REFUSED:
        return Verdict(check, cid, "pass", f"{cid}: the provider refused the fine-tune request ({cell.reason}); nothing to attack")
    m = cell.metrics or {}
    interval = gates.compare == "interval"
    metric = check.removeprefix(BASELINE)  # a baseline gate reads the pre-trained row's own metric
    if metric == "auc_amplification":
        amp = cell.amplification
        if amp is None:
            return Verdict(check, cid, "fail", f"{cid} has no AUC amplification (no pre-trained baseline to pair with)")
        value, ci = amp.delta, amp.ci95
        bound, text = (ci[1] if interval else value), _fmt(value, ci, True)
        name = "AUC amplification (after shaking minus before, paired)"
    elif metric == "tpr_at_1pct_fpr":
        entry = m["tpr_at_1pct_fpr"]
        n = entry.get("test_nonmembers", (cell.samples or {}).get("nonmembers"))
        if not entry.get("resolvable", True):
            return Verdict(check, cid, "skip", f"{cid}: TPR at 1% FPR needs at least 100 test non-members (after the calibration split), "
                                                f"this cell has {n}; add non-members or gate it on the pooled cell ([gates] domains = 'pooled' or 'both')")  # fmt: skip
        value, ci = entry["value"], entry["ci95"]
        bound, text, name = (ci[1] if interval else value), _fmt(value, ci, False), "TPR at 1% FPR (threshold fitted on a calibration split)"
    elif metric == "extracted" and "extracted_above_null" not in m:  # a matrix from before the null was counted
        value = bound = m["extracted"]
        text, name = f"{value} (a count: no interval)", "members extracted"
    elif metric == "extracted":
        excess = m["extracted_above_null"]
        value = bound = excess["value"]
        text = (
            f"{value:+.1f} [{excess['ci95'][0]:+.1f}, {excess['ci95'][1]:+.1f}] ({m['extracted']} members and "
            f"{m['nonmembers_matched']} held-out non-members matched; the point is gated)"
        )
        name = "members extracted above chance (members minus held-out non-members matched)"
    else:
        entry = m.get("conditional_accuracy")
        if entry is None:
            loss, fd = m.get("heldout_denoising_loss"), m.get("frechet_distance")
            return Verdict(check, cid, "skip", f"{cid}: no classifier reads this data's generations, so conditional accuracy is not "
                                                f"measured (reported: held-out denoising loss {loss if loss is None else f'{loss:.4f}'}, "
                                                f"Frechet distance {fd if fd is None else f'{fd:.2f}'}); [gates] min_utility judges the testbed's digits")  # fmt: skip
        value, ci = entry["value"], entry["ci95"]
        if value is None:
            return Verdict(check, cid, "fail", f"{cid}: the provider served no generation, so utility is 0", threshold=threshold)
        bound, text, name = (ci[0] if interval else value), _fmt(value, ci, False), "conditional accuracy"
        passed = bound >= threshold
        message = f"{cid}: {name} {text}; compared {bound:.3f} {'>=' if passed else '<'} minimum {threshold:g} ({where}); {_samples(cell)}"
        return Verdict(check, cid, "pass" if passed else "fail", message, value, bound, threshold)
    passed = bound <= threshold
    message = f"{cid}: {name} {text}; compared {bound:.3f} {'<=' if passed else '>'} maximum {threshold:g} ({where}); {_samples(cell)}"
    return Verdict(check, cid, "pass" if passed else "fail", message, value, bound, threshold)


def control_of(check: str, cell: PlannedCell, mode: str) -> tuple[str, str, str, str, int]:
    """The pooled cell that must leak for ``cell``'s gate to mean something, by (defense, attack,
    measure, domain, seed): under "release" the oracle row on the audited weights, which the
    provider fine-tunes itself (so an API defense's own refusals do not hide it: its weights are
    the undefended model's); under "compare" the undefended model's same attack (an adaptive
    variant's plain SP attack), or its oracle row for a baseline gate."""
    if mode == "release":
        return (cell.weights_of, cell.oracle, cell.measure, POOLED, cell.seed)
    attack = cell.oracle if check.startswith(BASELINE) else cell.base_attack or cell.attack
    return ("none", attack, cell.measure, POOLED, cell.seed)


def control_problem(check: str, cell: PlannedCell, cells: dict[tuple, GateCell], gates) -> str | None:
    """Why the positive control of ``cell``'s gate fails, or None when it leaks (utility has none)."""
    if check == "utility":
        return None
    key = control_of(check, cell, gates.mode)
    release = gates.mode == "release"
    what = "-".join(map(str, key[:4]))
    if not key[1]:
        return ("no oracle row is planned, so nothing shows the instrument can see leakage on this model; "
                "add a method to [matrix] member_shakers (e.g. ['end2end'])")  # fmt: skip
    control = cells.get(key)
    if control is None:
        fix = "rerun the matrix" if release else "add 'none' to [matrix] defenses (the gates need the undefended model)"
        return f"positive control {what} is not in the matrix; {fix}"
    if control.status != Status.OK:
        return f"positive control {what} did not run ({control.status}: {control.reason}); the gate cannot be judged"
    amp = control.amplification
    if amp is None:
        return f"positive control {what} has no amplification to show"
    level = amp.ci95[0] if gates.compare == "interval" else amp.delta
    if level > gates.control_min_amplification:
        return None
    by = "the lower end of its 95% interval" if gates.compare == "interval" else "its estimate"
    shown = (f"by {_fmt(amp.delta, amp.ci95, True)} ({_samples(control)}), not more than [gates] control_min_amplification = "
             f"{gates.control_min_amplification:g} by {by}")  # fmt: skip
    if release:
        return (f"the instrument cannot see leakage on this model: its oracle row {key[1]} (the method fine-tuned on the real "
                f"members) raises {key[2]} leakage {shown}; more members and non-members per domain, more generated "
                f"candidates ([extraction] candidates) or a longer oracle fine-tune would help; the gate is not judged")  # fmt: skip
    return (
        f"positive control failed: on the undefended model {key[1]} raises {key[2]} leakage {shown}; "
        f"this gate cannot tell a safe model from an insensitive test, so it is not judged"
    )


def judge(check: str, planned: PlannedCell, cells: dict[tuple, GateCell], gates) -> Verdict:
    """The gate on one cell, as :func:`judge_seed`; a pass is ``unstable`` when the same gate
    under another seed of the matrix does not pass."""
    v = judge_seed(check, planned, cells, gates)
    if v.outcome != "pass" or not planned.many_seeds:
        return v
    others = {seed: judge_seed(check, replace(planned, seed=seed), cells, gates).outcome for seed in seeds_of(planned, cells)}
    overturned = {seed: outcome for seed, outcome in others.items() if outcome != "pass"}
    if not overturned:
        return v
    under = "; ".join(f"{outcome} under seed {seed}" for seed, outcome in sorted(overturned.items()))
    return replace(v, outcome="unstable", message=f"UNSTABLE across seeds ({under}), so this pass does not stand: {v.message}")


def seeds_of(planned: PlannedCell, cells: dict[tuple, GateCell]) -> list[int]:
    """The seeds the matrix measured ``planned``'s cell under."""
    where = (planned.defense, planned.attack, planned.measure, planned.domain)
    return sorted(key[4] for key in cells if key[:4] == where)


def judge_seed(check: str, planned: PlannedCell, cells: dict[tuple, GateCell], gates) -> Verdict:
    """The gate on one cell under its own seed, its positive control included: a measured cell
    (ok or refused) whose control does not leak is an error; a cell that failed or did not run is
    judged as such."""
    cell = cells.get((planned.defense, planned.attack, planned.measure, planned.domain, planned.seed))
    v = verdict(check, cell, gates)
    if cell is None or not cell.measured:
        return v
    problem = control_problem(check, planned, cells, gates)
    return Verdict(check, planned.id, "error", f"{planned.id}: {problem}") if problem else v


def evaluate(results: dict, gates, planned: list[PlannedCell]) -> list[Verdict]:
    """Every gate of [gates] on the measured matrix (for reports and summaries)."""
    cells = cells_by_key(results)
    return [judge(check, p, cells, gates) for check in gates.checks for p in gate_plan(planned, gates, check)]


RANK = {"fail": 4, "unstable": 3, "error": 2, "pass": 1, "skip": 0}  # the worst verdict stands for a tile of several gates
LABEL = {"pass": "PASS", "fail": "FAIL", "unstable": "UNST", "error": "ERR", "skip": "skip"}


def count_text(verdicts: list[Verdict]) -> str:
    """``"3 pass, 1 fail, 2 error, 0 skip"``, and the unstable passes when there are any."""
    counts = {o: sum(v.outcome == o for v in verdicts) for o in RANK}
    text = f"{counts['pass']} pass, {counts['fail']} fail, {counts['error']} error, {counts['skip']} skip"
    return text + (f", {counts['unstable']} unstable (passes another seed overturns)" if counts["unstable"] else "")


def seed_outcomes(planned: list[PlannedCell], cells: dict[tuple, GateCell], gates) -> dict[tuple, set[str]]:
    """Each gate's outcomes under the matrix's seeds (each seed's own, as judge_seed gives them),
    by (check, defense, attack, measure, domain)."""
    outcomes: dict[tuple, set[str]] = defaultdict(set)
    for check in gates.checks:
        for cell in gate_plan(planned, gates, check):
            outcomes[check, cell.defense, cell.attack, cell.measure, cell.domain].add(judge_seed(check, cell, cells, gates).outcome)
    return outcomes


def flip_table(planned: list[PlannedCell], cells: dict[tuple, GateCell], gates) -> list[list[str]]:
    """How often each check's verdict flips across the matrix's seeds: [check, gates, flipping,
    flip rate (Wilson 95% interval), judged, flipping of the judged] rows and a total. A gate
    flips when its outcomes under the seeds are not all the same; it is judged when some seed
    passes or fails it (the others error or skip under every seed, which cannot flip a release)."""
    outcomes = seed_outcomes(planned, cells, gates)
    rows = []
    for check in [*gates.checks, "all"]:
        mine = [o for key, o in outcomes.items() if check in ("all", key[0])]
        if not mine:
            continue
        flips = sum(len(o) > 1 for o in mine)
        judged = [o for o in mine if o & {"pass", "fail"}]
        low, high = rate_with_interval(flips, len(mine))["ci95"]
        rows.append([check, str(len(mine)), str(flips), f"{flips / len(mine):.1%} ({low:.1%}-{high:.1%})", str(len(judged)),
                     str(sum(len(o) > 1 for o in judged))])  # fmt: skip
    return rows


def flip_kinds(planned: list[PlannedCell], cells: dict[tuple, GateCell], gates) -> dict[str, int]:
    """How many gates flip between which outcomes ("error/pass": some seeds pass, the others
    error), most common first."""
    kinds = Counter("/".join(sorted(o)) for o in seed_outcomes(planned, cells, gates).values() if len(o) > 1)
    return dict(kinds.most_common())


def summary_lines(judged: list[tuple[PlannedCell, Verdict]], mode: str) -> list[str]:
    """A compact defense x attack table of the worst verdict per tile (over measures, domains and
    checks; utility in its own column), then the counts: what the gate suite prints at its end."""
    tiles: dict[tuple[str, str], str] = {}
    for cell, v in judged:
        key = (cell.defense + (f" seed{cell.seed}" if cell.many_seeds else ""), "utility" if cell.measure == "utility" else cell.attack)
        if key not in tiles or RANK[v.outcome] > RANK[tiles[key]]:
            tiles[key] = v.outcome
    rows = list(dict.fromkeys(d for d, _ in tiles))
    columns = list(dict.fromkeys(a for _, a in tiles if a != "utility")) + (["utility"] if any(a == "utility" for _, a in tiles) else [])
    table = [["defense", *columns]] + [[d, *(LABEL[tiles[d, a]] if (d, a) in tiles else "-" for a in columns)] for d in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns) + 1)]
    lines = ["  ".join(text.ljust(w) for text, w in zip(r, widths)).rstrip() for r in table]
    lines.append(f"mode {mode}: {count_text([v for _, v in judged])} ({len(judged)} gates; "
                 f"a tile shows its worst verdict: FAIL > UNST > ERR > PASS > skip)")  # fmt: skip
    return lines

"""The report of a defense x attack matrix run: matrix.png, ROC curves, report.md and report.html.

Everything is read from the run folder's results.json (schema "s2l-guard/matrix/1"), so a
report can be rewritten without rerunning anything. Verdicts come from :mod:`.gates`, the
functions the gate suite uses, so the report and ``pytest suites/`` never disagree.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")  # no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .config import Config  # noqa: E402
from .decision import Outcome  # noqa: E402
from .formatting import format_interval  # noqa: E402
from .gates import LABEL, RANK, THRESHOLDS, Unmeasured, Verdict, count_text, evaluate, pooled_amplification, pooled_measure, units_of  # noqa: E402
from .results import POOLED, CellIndex, GateCell, Status, gate_cells  # noqa: E402
from .runner.matrix import config_of  # noqa: E402
from .runner.plan import plan  # noqa: E402

STATUS_TEXT = {"not-run": "not run", "refused": "refused", "failed": "failed", "absent": "n/a"}
EDGE = {"fail": "#c00000", "undecided": "#e08000"}  # a thick tile border makes these stand out
UTILITY_FILL = {"pass": "#d8f0d8", "fail": "#f6d0d0", "undecided": "#fbe3c0", "skip": "#e6e6e6"}


# ---------------------------------------------------------------- the matrix as data


@dataclass(frozen=True)
class Tile:
    """One (defense, attack, measure) of the matrix: the pooled cell's amplification and the gates' verdict."""

    status: str  # a cell status, or "absent" when this defense has no such attack
    value: float | None = None  # the amplification delta; conditional accuracy in the utility column
    ci: tuple[float, float] | None = None
    verdict: str | None = None  # the worst gate verdict; None when no gate judges it

    def text(self, sep: str = " ") -> str:
        verdict = LABEL[self.verdict] if self.verdict else ""
        if self.status != "ok":  # a cell that did not run is always skipped: no need to say so
            return f"{STATUS_TEXT.get(self.status, self.status)}{sep}{verdict if self.verdict != 'skip' else ''}".strip()
        if self.value is None:
            return f"no delta{sep}{verdict}".strip()
        return f"{verdict}{sep}{self.value:+.3f}".strip()


@dataclass(frozen=True)
class Matrix:
    rows: list[tuple[str, int]]  # (defense, its first replicate: whose table the ROC curves and the defense column show)
    row_labels: list[str]
    columns: list[tuple[str, str]]  # (attack, measure)
    omitted: list[tuple[str, str]]  # columns where no cell ran for any defense
    tiles: dict[tuple[int, int], Tile]
    utility: list[Tile]  # per row: conditional accuracy and the utility gate's verdict

    @staticmethod
    def label(column: tuple[str, str]) -> str:
        return f"{column[0]} / {column[1]}"


def worst(verdicts: list[Verdict]) -> str | None:
    return max((v.outcome for v in verdicts), key=RANK.__getitem__, default=None)


def verdicts_by_cell(verdicts: list[Verdict]) -> dict[str, list[Verdict]]:
    out = defaultdict(list)
    for v in verdicts:
        out[v.cell_id].append(v)
    return out


def build_matrix(results: dict, verdicts: list[Verdict]) -> Matrix:
    """Rows: defenses; columns: every shaken attack x measure, pooled over domains, replicates and draws."""
    by_cell = verdicts_by_cell(verdicts)
    cells = gate_cells(results)
    by_key = CellIndex((c.key, c) for c in cells)
    first = results["seeds"][0]
    rows = [(d, first) for d in results["defenses"]]
    threat = {c.defense: c.threat_model for c in cells}
    labels = [d + (f"\n({threat[d]})" if threat.get(d) else "") for d, _ in rows]

    columns, domain_verdicts = {}, defaultdict(list)
    for c in cells:
        if c.measure == "utility" or c.attack == "pretrained":
            continue
        columns.setdefault((c.attack, c.measure), None)  # first appearance keeps the table's row order
        if not c.pooled:
            domain_verdicts[c.defense, c.attack, c.measure] += by_cell.get(c.gate_id, [])

    def tile(defense: str, column: tuple[str, str]) -> Tile:
        key = (defense, *column, POOLED)
        units = units_of(key, by_key)
        if not units:
            return Tile("absent")
        verdict = worst(by_cell.get(units[0].gate_id, [])) or worst(domain_verdicts[key[:3]])
        broken = next((c for c in units if c.status != Status.OK), None)
        if broken is not None:
            return Tile(broken.status.value, verdict=verdict)
        amp = pooled_amplification(key, by_key)
        return Tile("ok", verdict=verdict) if isinstance(amp, Unmeasured) else Tile("ok", amp.value, amp.ci95, verdict)

    every = {(i, col): tile(d, col) for i, (d, _) in enumerate(rows) for col in columns}
    ran = [col for col in columns if any(every[i, col].status not in ("absent", "not-run") for i in range(len(rows)))]
    omitted = [col for col in columns if col not in ran]
    tiles = {(i, j): every[i, col] for i in range(len(rows)) for j, col in enumerate(ran)}
    utility = [utility_tile(by_key, d, by_cell) for d, _ in rows]
    return Matrix(rows, labels, ran, omitted, tiles, utility)


def utility_cell(cells: list[GateCell], defense: str, seed: int) -> GateCell | None:
    return next((c for c in cells if c.measure == "utility" and c.defense == defense and c.seed == seed and c.draw == 0), None)


def utility_tile(cells: dict, defense: str, by_cell: dict[str, list[Verdict]]) -> Tile:
    """Conditional accuracy pooled over replicates and draws, and the utility gate's verdict."""
    key = (defense, "-", "utility", POOLED)
    units = units_of(key, cells)
    if not units:
        return Tile("absent")
    verdict = worst(by_cell.get(units[0].gate_id, []))
    broken = next((c for c in units if c.status != Status.OK), None)
    if broken is not None:
        return Tile(broken.status.value, verdict=verdict)
    accuracy = pooled_measure("utility", key, cells)
    if isinstance(accuracy, Unmeasured):
        return Tile("no generations" if "served no generation" in accuracy.reason else "not read", verdict=verdict)
    return Tile("ok", accuracy.value, accuracy.ci95, verdict)


# ---------------------------------------------------------------- figures


def _limit(values: np.ndarray, floor: float) -> float:
    """A symmetric colour range (so 0 stays white) covering ``values``, at least +-``floor``."""
    finite = np.abs(values[np.isfinite(values)])
    return max(float(finite.max()) if finite.size else 0.0, floor)


def plot_matrix(m: Matrix, path: Path, title: str, scale_min: float = 0.05) -> Path:
    """Heatmap of amplification deltas, each tile marked with its verdict; utility in a side column.

    AUC deltas and changes in extracted members have different units, so the extraction
    columns get their own colour range (drawn over the AUC image); the colour bar is AUC's.
    """
    nrows, ncols = len(m.rows), max(len(m.columns), 1)
    values = np.full((nrows, ncols), np.nan)
    for (i, j), t in m.tiles.items():
        if t.status == "ok" and t.value is not None:
            values[i, j] = t.value
    extraction = np.array([c[1] == "extraction" for c in m.columns] + [False] * (ncols - len(m.columns)))
    limit = _limit(values[:, ~extraction], scale_min)
    count_limit = _limit(values[:, extraction], 1.0)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#d9d9d9")  # grey: cells that did not run

    width, height = 2.4 + 0.66 * ncols + 1.5, 2.4 + 0.55 * nrows
    fig = plt.figure(figsize=(width, height))
    grid = fig.add_gridspec(1, 3, width_ratios=[ncols, 2.0, 0.25], wspace=0.08)
    ax, side, cax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1]), fig.add_subplot(grid[2])
    image = ax.imshow(np.where(extraction, np.nan, values), cmap=cmap, norm=Normalize(-limit, limit), aspect="auto")
    for (i, j), t in m.tiles.items():
        scale = count_limit if extraction[j] else limit
        if t.status == "absent":
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="none"))
        elif extraction[j] and np.isfinite(values[i, j]):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=cmap(Normalize(-scale, scale)(values[i, j])), edgecolor="none"))
        if t.verdict in EDGE:
            ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor=EDGE[t.verdict], linewidth=1.6))
        dark = t.value is not None and abs(t.value) > 0.6 * scale
        ax.text(j, i, t.text("\n"), ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    ax.set_xticks(range(len(m.columns)), [Matrix.label(c) for c in m.columns], rotation=55, ha="right", rotation_mode="anchor", fontsize=7)
    ax.set_yticks(range(nrows), m.row_labels, fontsize=7)
    ax.set_xticks(np.arange(-0.5, ncols), minor=True)
    ax.set_yticks(np.arange(-0.5, nrows), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)

    side.set_xlim(0, 1)
    side.set_ylim(nrows - 0.5, -0.5)
    side.axis("off")
    side.set_title("utility\n(conditional accuracy)", fontsize=7)
    for i, t in enumerate(m.utility):
        side.add_patch(Rectangle((0.04, i - 0.46), 0.92, 0.92, facecolor=UTILITY_FILL.get(t.verdict or "skip"), edgecolor="none"))
        text = f"{t.value:.2f} [{t.ci[0]:.2f}, {t.ci[1]:.2f}]\n{LABEL.get(t.verdict, '')}" if t.status == "ok" else t.text("\n")
        side.text(0.5, i, text, ha="center", va="center", fontsize=6.5)

    bar = fig.colorbar(image, cax=cax)
    bar.set_label(
        f"AUC amplification (after shaking minus before); extraction columns:\nchange in members extracted, same colours at +-{count_limit:g}",
        fontsize=7,
    )
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=8.5)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def matrix_title(results: dict, config: Config, m: Matrix) -> str:
    left_out = f"; {len(m.omitted)} columns where no cell ran are left out" if m.omitted else ""
    return (f"S2L defense x attack matrix, profile {config.name}: colour = AUC amplification delta (MIA) or\n"
            f"extraction amplification delta (extraction), pooled over {len(results['domains'])} domains; "
            f"tile = gate verdict (worst over domains){left_out}")  # fmt: skip


def roc_curves(results: dict, defense: str, seed: int) -> dict[tuple[str, str, str], dict]:
    """(attack, domain, mia) -> the ok per-domain ROC curve of one defense's table."""
    return {(c.attack, c.domain, c.measure): c.metric("roc_curve") for c in gate_cells(results)
            if c.defense == defense and c.seed == seed and c.draw == 0 and c.status == Status.OK and c.metric("roc_curve")}  # fmt: skip


def plot_roc(results: dict, defense: str, seed: int, mias: list[str], path: Path) -> Path | None:
    """Rows: shaken attacks, columns: domains; each MIA's curve after shaking (solid) and on the
    pre-trained model (dashed), same colour. None when the defense has no ROC curve to show."""
    curves = roc_curves(results, defense, seed)
    attacks = list(dict.fromkeys(a for a, _, _ in curves if a != "pretrained"))
    if not attacks:
        return None
    domains = results["domains"]
    colours = dict(zip(mias, plt.get_cmap("tab10").colors))
    size = (2.1 * len(domains) + 0.6, 2.1 * len(attacks) + 0.9)
    fig, axes = plt.subplots(len(attacks), len(domains), figsize=size, squeeze=False, layout="constrained")
    for (r, attack), (c, domain) in ((ra, cd) for ra in enumerate(attacks) for cd in enumerate(domains)):
        ax = axes[r, c]
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle=":")
        for mia in mias:
            # the dashed baseline is drawn over a lighter solid curve, so both show where they coincide
            for row, style, alpha in ((attack, "-", 0.55), ("pretrained", "--", 1.0)):
                curve = curves.get((row, domain, mia))
                if curve:
                    ax.plot(curve["fpr"], curve["tpr"], linestyle=style, color=colours[mia], alpha=alpha, linewidth=1.3)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_title(f"{attack} / {domain}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("FPR" if r == len(attacks) - 1 else "", fontsize=7)
        ax.set_ylabel("TPR" if c == 0 else "", fontsize=7)
    handles = [plt.Line2D([], [], color=colours[m], label=m) for m in mias]
    handles.append(plt.Line2D([], [], color="black", linestyle="--", label="pre-trained (same MIA)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=7, frameon=False)
    fig.suptitle(f"ROC curves, defense {defense}: shaken (solid) vs pre-trained (dashed)", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def copy_ablations(run_dir: Path, ablation_dirs) -> list[tuple[Path, Path]]:
    """Copy every ablation-*.png of ``ablation_dirs`` beside the report, so the folder stands
    alone (a missing folder has none); returns (source, copy) pairs."""
    out: list[tuple[Path, Path]] = []
    for folder in map(Path, ablation_dirs):
        for source in sorted(folder.glob("ablation-*.png")):
            target = run_dir / source.name
            if any(copy == target for _, copy in out):  # the same plot name from two folders
                target = run_dir / f"{folder.name}-{source.name}"
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)
            out.append((source, target))
    return out


# ---------------------------------------------------------------- the report's content


def distinct(values) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values)) or "-"


def sample_lines(cells: list[GateCell]) -> list[str]:
    """The sample counts behind the cells, per kind of cell (each distinct count once)."""
    ok = [c for c in cells if c.status == Status.OK and c.samples]
    mia = [c for c in ok if c.measure not in ("extraction", "utility")]
    extraction = [c for c in ok if c.measure == "extraction"]
    pairs = lambda cs: distinct(f"{c.samples['members']} vs {c.samples['nonmembers']}" for c in cs)  # noqa: E731
    return [
        f"MIA cells, members vs non-members: {pairs(c for c in mia if not c.pooled)} per domain, "
        f"{pairs(c for c in mia if c.pooled)} pooled",
        f"bootstrap resamples: {distinct(c.samples['bootstrap'] for c in mia)}",
        f"extraction cells, generated candidates: {distinct(c.samples['candidates'] for c in extraction if not c.pooled)} "
        f"per domain, {distinct(c.samples['candidates'] for c in extraction if c.pooled)} pooled",
        f"utility cells, generations: {distinct(c.samples['generations'] for c in ok if c.measure == 'utility')}",
    ]  # fmt: skip


def matrix_entry(t: Tile) -> str:
    if t.status == "ok" and t.value is not None:
        return f"{format_interval(t.value, t.ci, signed=True)} {LABEL.get(t.verdict, '')}".strip()
    return t.text()


def defense_rows(results: dict, m: Matrix) -> list[list[str]]:
    cells = gate_cells(results)
    out = []
    for (defense, seed), label, u in zip(m.rows, m.row_labels, m.utility):
        table = results["tables"].get(f"{defense}/{seed}", {})  # the first replicate's first draw
        privacy = table.get("report", {}).get("pretraining", {}).get("privacy")
        epsilon = f"{privacy['epsilon']:.2f} (delta {privacy['delta']:.1e})" if privacy else "-"
        cell = utility_cell(cells, defense, seed)
        metrics = (cell.metrics if cell else None) or {}
        accuracy = f"{format_interval(u.value, u.ci)} {LABEL.get(u.verdict, '')}".strip() if u.status == "ok" else u.text()
        served = f"{metrics['served_share']:.1%}" if "served_share" in metrics else "-"
        frechet = f"{metrics['frechet_distance']:.2f}" if metrics.get("frechet_distance") is not None else "-"
        wall = f"{table['wall_seconds']:.1f}" if "wall_seconds" in table else "-"
        status = table.get("status", "missing") + (f": {table['reason']}" if table.get("reason") else "")
        out.append([label.split("\n")[0], table.get("threat_model") or "-", epsilon, accuracy, served, frechet, wall, status])
    return out


def _released_figure(pooled: GateCell | None) -> str:
    """What a baseline gate reads on the pooled pre-trained cell, or why there is nothing."""
    if pooled is None or pooled.status != Status.OK:
        return pooled.status.value if pooled else "-"
    extraction = pooled.measure == "extraction"
    entry = pooled.metric("extracted_above_null" if extraction else "tpr_at_1pct_fpr")
    if entry is None and extraction:  # a matrix from before the null was counted: the raw count is gated
        return f"{pooled.metric('extracted')} extracted"
    return format_interval(entry["value"], entry["ci95"], signed=extraction) if entry else "-"


def baseline_rows(results: dict, verdicts: list[Verdict]) -> tuple[list[str], list[list[str]]]:
    """The model as released (the pre-trained row, pooled): each measure's gated figure - calibrated
    TPR at 1% FPR for an MIA, members extracted above the null - and the worst baseline verdict
    over its domains. Empty when no baseline gate ran."""
    baseline = [v for v in verdicts if v.check.startswith("baseline_")]
    if not baseline:
        return [], []
    cells = [c for c in gate_cells(results) if c.attack == "pretrained"]
    by_cell = verdicts_by_cell(baseline)
    measures = list(dict.fromkeys(c.measure for c in cells))
    rows = []
    by_key = CellIndex((c.key, c) for c in cells)
    for defense in results["defenses"]:
        mine = [c for c in cells if c.defense == defense]
        row = [defense]
        for measure in measures:
            key = (defense, "pretrained", measure, POOLED)
            figure = pooled_measure("baseline_extracted" if measure == "extraction" else "baseline_tpr_at_1pct_fpr", key, by_key)
            verdict = worst([v for c in mine if c.measure == measure for v in by_cell.get(c.gate_id, [])])
            text = (
                figure.text(signed=measure == "extraction")
                if not isinstance(figure, Unmeasured)
                else _released_figure(by_key.get((*key, results["seeds"][0], 0)))
            )
            row.append(f"{text} {LABEL.get(verdict, '')}".strip())
        rows.append(row)
    return ["defense"] + [f"{m} ({'share of members above null' if m == 'extraction' else 'TPR at 1% FPR'})" for m in measures], rows


def blind_rows(blind: dict) -> list[list[str]]:
    """One row per replicate and domain of results.json's blind baselines."""
    rows = []
    for seed, entries in blind.items():
        for domain, e in entries.items():
            if "auc" not in e:  # too few images to cross-validate
                rows.append([seed, domain, "-", "-", f"no ({e.get('reason', 'not measured')})"])
                continue
            rows.append([seed, domain, format_interval(e["auc"], e["ci95"]), f"{e['members']} vs {e['nonmembers']}", "YES" if e["fires"] else "no"])
    return rows


def failure_lines(verdicts: list[Verdict]) -> list[str]:
    return [f"{v.check}: {v.message}" for v in verdicts]


def error_lines(verdicts: list[Verdict]) -> list[str]:
    """One line per distinct problem: a control that does not leak stands behind many gates."""
    gates = defaultdict(list)
    for v in verdicts:
        gates[v.message.removeprefix(f"{v.cell_id}: ")].append(f"{v.cell_id} ({v.check})")
    return [f"{problem} [{len(ids)} gate(s): {', '.join(ids)}]" for problem, ids in gates.items()]


def not_run_lines(cells: list[GateCell]) -> list[str]:
    reasons = defaultdict(list)
    for c in cells:
        if c.status != Status.OK:
            reasons[(c.status.value, c.reason or "no reason given")].append(c)
    return [f"{status} ({len(cs)} cells; defenses {distinct(c.defense for c in cs)}): {reason}" for (status, reason), cs in reasons.items()]


def report_blocks(results: dict, config: Config, verdicts: list[Verdict], m: Matrix, rocs: list[Path], ablations) -> list[tuple]:
    """The report as blocks, rendered to Markdown and to HTML alike:
    ("h", level, text), ("p", text), ("ul", items), ("table", header, rows), ("img", alt, file name)."""
    g = config.gates
    cells = gate_cells(results)
    thresholds = [[check, key, f"{getattr(g, key):g}", "yes" if check in g.checks else "no"] for check, key in THRESHOLDS.items()]
    blocks = [
        ("h", 1, f"S2L matrix report: {config.name}"),
        ("h", 2, "How it was obtained"),
        (
            "ul",
            [
                f"config: `{results['config_source']}` (resolved config in results.json)",
                f"code version: `{results['code_version']}` (s2l-guard {results['s2l_guard_version']})",
                f"defenses: {', '.join(results['defenses'])}; testbed replicates: {', '.join(map(str, results['seeds']))}; "
                f"attack draws: {', '.join(map(str, results.get('draws', [0])))} (every gate pools them; docs/gates.md)",
                f"private domains attacked: {', '.join(results['domains'])} (matrix tiles pool them: domain `{POOLED}`)",
                *sample_lines(cells),
                f"wall time: {results['wall_seconds']:.1f} s for the whole matrix (cached cells cost nothing)",
            ],
        ),  # fmt: skip
        ("h", 2, "Gates"),
        (
            "p",
            f"mode = {g.mode}; compare = {g.compare}; domains = {g.domains}. Each gate pools its cells over replicates and draws "
            f"into one 95% interval: PASS when its unfavourable end is within the threshold, FAIL when its favourable end is "
            f"beyond it, UNDECIDED when it straddles the threshold or the measure cannot be trusted here (it does not "
            f"demonstrably see membership on the model, or a blind baseline separates the members from the non-members).",
        ),  # fmt: skip
        ("table", ["check", "threshold", "value", "enabled"], thresholds),
        ("p", f"Verdicts: {count_text(verdicts)} ({len(verdicts)} gates)."),
        ("h", 2, "Matrix"),
        (
            "p",
            "Each entry: amplification delta (after shaking minus before; AUC for MIAs, distinct members extracted for extraction) "
            "of the cell pooled over domains, replicates and draws, its 95% interval, and the gate verdict (the pooled cell's, "
            "else the worst over its domains: FAIL > UNDEC > PASS > skip).",
        ),  # fmt: skip
        ("img", "matrix", "matrix.png"),
        (
            "table",
            ["defense"] + [Matrix.label(c) for c in m.columns],
            [[label.split("\n")[0]] + [matrix_entry(m.tiles[i, j]) for j in range(len(m.columns))] for i, label in enumerate(m.row_labels)],
        ),
    ]
    if m.omitted:
        blocks.append(("p", f"Left out (no defense ran them): {', '.join(Matrix.label(c) for c in m.omitted)}."))
    header, rows = baseline_rows(results, verdicts)
    if rows:
        blocks += [
            ("h", 2, "The model as released"),
            ("p", "The pre-trained row before any shaking, pooled over domains, with the worst baseline gate verdict over its cells."),
            ("table", header, rows),
        ]
    if results.get("blind"):
        blocks += [
            ("h", 2, "Blind baseline: is the split i.i.d.?"),
            (
                "p",
                f"A cross-validated classifier on the images alone (no model) against each domain's members and held-out "
                f"non-members. Where the lower end of its AUC interval exceeds 0.5 + {config.gates.blind_margin:g}, members and "
                f"non-members differ without the model and no MIA gate on that data passes (docs/attacks.md).",
            ),  # fmt: skip
            ("table", ["replicate", "domain", "blind AUC [95% CI]", "members vs non-members", "fires"], blind_rows(results["blind"])),
        ]
    blocks += [
        ("h", 2, "Defenses"),
        (
            "table",
            ["defense", "threat model", "epsilon", "conditional accuracy [95% CI]", "served share", "Frechet distance", "wall seconds", "table"],
            defense_rows(results, m),
        ),  # fmt: skip
        ("h", 2, "Failed gates"),
        ("ul", failure_lines([v for v in verdicts if v.outcome == Outcome.FAIL]) or ["none"]),
        ("h", 2, "Undecided gates"),
        ("ul", error_lines([v for v in verdicts if v.outcome == Outcome.UNDECIDED]) or ["none"]),
        ("h", 2, "Cells that did not run"),
        ("ul", not_run_lines(cells) or ["none"]),
    ]
    if rocs:
        blocks.append(("h", 2, "ROC curves"))
        blocks += [("img", p.stem, p.name) for p in rocs]
    if ablations:
        blocks += [("h", 2, "Ablations"), ("ul", [f"`{copy.name}` from `{source}`" for source, copy in ablations])]
        blocks += [("img", copy.stem, copy.name) for _, copy in ablations]
    return blocks


# ---------------------------------------------------------------- rendering


CODE_SPAN = re.compile(r"(`[^`\n]+`)")
MARKUP = re.compile(r"\\|<(?=[A-Za-z/!?])|\](?=[(\[:])")  # a backslash, a tag's or autolink's start, a link's middle


def md_text(text: str) -> str:
    """Text that Markdown shows literally, whoever wrote it (a domain name or a path from the
    user's data or config): outside `code` spans no ``](``, ``][`` or ``]:`` can make a link or
    image and no ``<`` an HTML tag or autolink (each is backslash-escaped), and a newline cannot
    start a new block; code spans render their content as text already. Intervals like
    [0.61, 0.72] stay as they are."""
    escape = lambda part: MARKUP.sub(lambda m: "\\" + m.group(0), part.replace("\n", " "))  # noqa: E731
    return "".join(part if CODE_SPAN.fullmatch(part) else escape(part) for part in CODE_SPAN.split(str(text)))


def to_markdown(blocks: list[tuple]) -> str:
    cell = lambda text: md_text(text).replace("|", "\\|")  # noqa: E731 - a pipe would end the cell
    out = []
    for kind, *args in blocks:
        if kind == "h":
            out.append("#" * args[0] + " " + md_text(args[1]))
        elif kind == "p":
            out.append(md_text(args[0]))
        elif kind == "ul":
            out.append("\n".join(f"- {md_text(item)}" for item in args[0]))
        elif kind == "img":
            out.append(f"![{md_text(args[0])}]({quote(str(args[1]))})")
        elif kind == "table":
            header, rows = args
            lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
            out.append("\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]))
    return "\n\n".join(out) + "\n"


STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 2em; max-width: 1600px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.pass { background: #d8f0d8; } td.fail { background: #f6c6c6; } td.undecided { background: #fbe3c0; } td.skip { background: #eee; }
.wide { overflow-x: auto; }
img { border: 1px solid #eee; margin: 0.5em 0; }  /* natural size: a wide matrix scrolls rather than shrinks */
code { background: #f4f4f4; padding: 0 3px; }
"""
VERDICT_CLASS = {"PASS": "pass", "FAIL": "fail", "UNDEC": "undecided", "skip": "skip", "not run": "skip"}


def inline(text: str) -> str:
    """Escaped text with `code` spans (the only markup the blocks use)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text)))


def td(text: str) -> str:
    found = re.search(r"\b(PASS|FAIL|UNDEC|skip)\b|not run", str(text))
    css = f' class="{VERDICT_CLASS[found.group(0)]}"' if found else ""
    return f"<td{css}>{inline(text)}</td>"


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: list[tuple], folder: Path) -> str:
    """A self-contained page: inline style, images as data URIs, nothing fetched."""
    body = []
    for kind, *args in blocks:
        if kind == "h":
            body.append(f"<h{args[0]}>{inline(args[1])}</h{args[0]}>")
        elif kind == "p":
            body.append(f"<p>{inline(args[0])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in args[0]) + "</ul>")
        elif kind == "img":
            body.append(f'<div class="wide"><img alt="{html.escape(args[0])}" src="{data_uri(folder / args[1])}"></div>')
        elif kind == "table":
            header, rows = args
            head = "<tr>" + "".join(f"<th>{inline(h)}</th>" for h in header) + "</tr>"
            body.append('<div class="wide"><table>' + head + "".join("<tr>" + "".join(map(td, row)) + "</tr>" for row in rows) + "</table></div>")
    title = inline(blocks[0][2]) if blocks and blocks[0][0] == "h" else "S2L matrix report"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head>\n'
            f"<body>\n" + "\n".join(body) + "\n</body></html>\n")  # fmt: skip


# ---------------------------------------------------------------- entry point


def write_report(run_dir: Path, ablation_dirs=()) -> list[Path]:
    """Write matrix.png, roc-<defense>.png, report.md and report.html into ``run_dir`` from its
    results.json; ablation-*.png plots found in ``ablation_dirs`` are copied beside them and
    embedded. Returns the paths written."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    config = config_of(results)
    verdicts = evaluate(results, config.gates, plan(config, results["defenses"]))
    m = build_matrix(results, verdicts)
    written = [plot_matrix(m, run_dir / "matrix.png", matrix_title(results, config, m), config.gates.max_auc_amplification)]
    rocs = []
    for defense, seed in m.rows:  # the first replicate's first draw
        name = f"roc-{defense}.png"
        roc = plot_roc(results, defense, seed, list(config.attack.mia), run_dir / name)
        rocs += [roc] if roc else []
    ablations = copy_ablations(run_dir, ablation_dirs)
    blocks = report_blocks(results, config, verdicts, m, rocs, ablations)
    (run_dir / "report.md").write_text(to_markdown(blocks))
    (run_dir / "report.html").write_text(to_html(blocks, run_dir))
    return written + rocs + [copy for _, copy in ablations] + [run_dir / "report.md", run_dir / "report.html"]

"""The matrix report, written from a real results.json of the smoke profile (4 defenses, 2 domains)."""

import base64
import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from s2l_guard.gates import evaluate
from s2l_guard.report import build_matrix, plot_matrix, write_report
from s2l_guard.runner.matrix import config_of
from s2l_guard.runner.plan import POOLED, plan

FIXTURE = Path(__file__).parent / "data" / "matrix-smoke-results.json"
PNG = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # the IHDR chunk


def section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def items(text: str) -> list[str]:
    return re.findall(r"^- (.*)$", text, re.M)


def table(text: str) -> list[list[str]]:
    """The first Markdown table of ``text``, header first, without the separator line."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines if not line.startswith("|---")]


def verdicts_of(results: dict):
    config = config_of(results)
    return evaluate(results, config.gates, plan(config, results["defenses"]))


def write(tmp_path: Path, results: dict, ablation_dirs=()) -> tuple[Path, list[Path]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path, write_report(tmp_path, ablation_dirs=ablation_dirs)


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def verdicts(results):
    return verdicts_of(results)


@pytest.fixture(scope="module")
def report(tmp_path_factory, results):
    """The report of the unchanged fixture, with one ablation plot beside it to embed."""
    ablations = tmp_path_factory.mktemp("ablations")
    fig = plt.figure(figsize=(2, 2))
    fig.savefig(ablations / "ablation-lora-rank.png")
    plt.close(fig)
    (ablations / "lora-rank.png").write_bytes((ablations / "ablation-lora-rank.png").read_bytes())  # not an ablation-*.png
    run, written = write(tmp_path_factory.mktemp("run"), results, [ablations, ablations / "missing"])
    return run, written, (run / "report.md").read_text()


def test_writes_figures_and_both_reports(report):
    run, written, _ = report
    # finetune_filter and output_filter are attacked through the fine-tune API: no MIA ran, so no ROC figure
    assert sorted(p.name for p in written) == ["ablation-lora-rank.png", "matrix.png", "report.html", "report.md", "roc-dp_sgd.png", "roc-none.png"]
    assert all(p.parent == run and p.is_file() for p in written)
    for p in written:
        if p.suffix == ".png":
            assert png_size(p.read_bytes())[0] > 100
    assert not (run / "lora-rank.png").exists()


def test_matrix_figure_widens_with_columns(tmp_path, results, verdicts):
    full = build_matrix(results, verdicts)
    fewer = build_matrix(dict(results, cells=[c for c in results["cells"] if c["attack"] in ("pretrained", "lora")]), verdicts)
    assert len(fewer.columns) == 5 < len(full.columns)  # lora x (4 MIAs + extraction)
    wide = png_size(plot_matrix(full, tmp_path / "full.png", "full").read_bytes())
    narrow = png_size(plot_matrix(fewer, tmp_path / "fewer.png", "fewer").read_bytes())
    assert wide[0] > narrow[0] + 200 and wide[1] == pytest.approx(narrow[1], rel=0.3)


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained(report):
    run, written, _ = report
    page = (run / "report.html").read_text()
    parser = Tags()
    parser.feed(page)
    images = [a["src"] for t, a in parser.tags if t == "img"]
    assert len(images) == sum(p.suffix == ".png" for p in written)
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    assert not [t for t, a in parser.tags if t in ("link", "script", "iframe", "object") or (t != "img" and ("src" in a or "href" in a))]
    assert "http://" not in page and "https://" not in page
    assert "<style>" in page


def test_markdown_matrix_has_a_row_per_defense_and_a_column_per_attack_and_measure(report, results, verdicts):
    _, _, markdown = report
    header, *rows = table(section(markdown, "Matrix"))
    assert [r[0] for r in rows] == results["defenses"]
    # every shaken (attack, measure), pooled, that ran for some defense; adaptive MIAs ran for none
    ran = [c for c in results["cells"] if c["domain"] == POOLED and c["attack"] not in ("pretrained", "-") and c["status"] != "not-run"]
    assert header[1:] == list(dict.fromkeys(f"{c['attack']} / {c['measure']}" for c in ran))
    assert len(header) == 1 + 31 and "end2end-perturb / extraction" in header and "end2end-perturb / secmi" not in header
    assert "end2end-perturb / secmi" in section(markdown, "Matrix").split("Left out", 1)[1]

    cell = next(c for c in results["cells"] if c["id"] == "dp_sgd-lora-pia-all")
    amp = cell["metrics"]["auc_amplification"]
    outcomes = {v.outcome for v in verdicts if v.cell_id.startswith("dp_sgd-lora-pia-digit") and v.check == "auc_amplification"}
    assert outcomes == {"undecided"}  # the undefended model's lora/pia does not leak in the smoke profile
    entry = rows[1][header.index("lora / pia")]
    assert entry == f"{amp['delta']:+.3f} [{amp['ci95'][0]:+.3f}, {amp['ci95'][1]:+.3f}] UNDEC"  # one draw: its own interval
    assert rows[3][header.index("lora / pia")] == "not run"  # output_filter: the API gives no weights
    assert rows[3][header.index("lora-mix / extraction")] == "n/a"  # adaptive rows only exist against the fine-tune filter


def test_summary_counts_are_the_gates_verdicts(report, verdicts):
    _, _, markdown = report
    counts = Counter(v.outcome for v in verdicts)
    found = re.search(r"Verdicts: (\d+) pass, (\d+) fail, (\d+) undecided, (\d+) skip \((\d+) gates\)", markdown)
    assert found and [int(x) for x in found.groups()] == [counts[o] for o in ("pass", "fail", "undecided", "skip")] + [len(verdicts)]
    assert counts["fail"] == 4 and counts["undecided"] > 0  # utility fails everywhere in the smoke profile
    # the fixture predates extraction shares: its extraction gates cannot be judged, and say so
    assert {v.outcome for v in verdicts if v.check == "extracted" and v.outcome != "skip"} == {"undecided"}


def test_defense_table_and_problem_lists(report, results, verdicts):
    _, _, markdown = report
    header, *rows = table(section(markdown, "Defenses"))
    by_defense = {r[0]: dict(zip(header, r)) for r in rows}
    epsilon = results["tables"]["dp_sgd/0"]["report"]["pretraining"]["privacy"]["epsilon"]
    assert by_defense["dp_sgd"]["epsilon"].startswith(f"{epsilon:.2f}") and by_defense["none"]["epsilon"] == "-"
    assert by_defense["finetune_filter"]["threat model"] == "finetune-api"
    assert by_defense["none"]["conditional accuracy [95% CI]"] == "0.062 [0.017, 0.201] FAIL"

    failed = section(markdown, "Failed gates")
    for v in verdicts:
        if v.outcome == "fail":
            assert v.message in failed
    undecided = section(markdown, "Undecided gates")
    assert all(f"{v.cell_id} ({v.check})" in undecided for v in verdicts if v.outcome == "undecided")
    assert len(items(undecided)) < sum(v.outcome == "undecided" for v in verdicts)  # one line per failed control, not per gate

    not_run = section(markdown, "Cells that did not run")
    reasons = {c["reason"] for c in results["cells"] if c["status"] != "ok"}
    assert all(not_run.count(r) == 1 for r in reasons) and len(items(not_run)) == len(reasons)
    assert "![matrix](matrix.png)" in markdown and "![roc-none](roc-none.png)" in markdown
    assert "`ablation-lora-rank.png` from" in section(markdown, "Ablations")


def test_a_failed_cell_fails_its_tile_and_is_listed(tmp_path, results):
    changed = json.loads(json.dumps(results))
    cell = next(c for c in changed["cells"] if c["id"] == "dp_sgd-lora-secmi-digit7")
    cell.update(status="failed", reason="CUDA out of memory")
    del cell["metrics"], cell["samples"]
    run, _ = write(tmp_path, changed)
    markdown = (run / "report.md").read_text()

    [failure] = [v for v in verdicts_of(changed) if v.cell_id == cell["id"] and v.outcome == "fail" and v.check == "auc_amplification"]
    assert failure.message in section(markdown, "Failed gates")
    header, *rows = table(section(markdown, "Matrix"))
    assert rows[1][header.index("lora / secmi")].endswith("FAIL")  # the worst verdict over the tile's domains
    assert rows[0][header.index("lora / secmi")].endswith("UNDEC")
    assert "failed (1 cells; defenses dp_sgd): CUDA out of memory" in section(markdown, "Cells that did not run")
    assert re.search(r'<td class="fail">[^<]*FAIL</td>', (run / "report.html").read_text())


def test_the_blind_baseline_is_reported_beside_the_mias(tmp_path, results, report):
    assert "## Blind baseline" not in report[2]  # the fixture predates it
    changed = json.loads(json.dumps(results))
    changed["blind"] = {"0": {"digit7": {"auc": 0.55, "ci95": [0.42, 0.68], "members": 6, "nonmembers": 6, "fires": False, "message": ""},
                              "all": {"auc": 0.97, "ci95": [0.9, 1.0], "members": 12, "nonmembers": 12, "fires": True, "message": ""},
                              "digit8": {"fires": False, "reason": "too few to cross-validate"}}}  # fmt: skip
    run, _ = write(tmp_path, changed)
    header, *rows = table(section((run / "report.md").read_text(), "Blind baseline: is the split i.i.d.?"))
    assert header[2] == "blind AUC [95% CI]" and [r[1] for r in rows] == ["digit7", "all", "digit8"]
    assert rows[0][2].startswith("0.550 [0.420") and rows[0][4] == "no" and rows[1][4] == "YES" and "too few" in rows[2][4]


def test_the_model_as_released_has_its_own_table_when_baseline_gates_run(tmp_path, results, report):
    assert "## The model as released" not in report[2]  # the fixture's [gates] predate the baseline gates
    changed = json.loads(json.dumps(results))
    changed["config"]["gates"]["checks"] += ["baseline_tpr_at_1pct_fpr", "baseline_extracted"]
    run, _ = write(tmp_path, changed)
    header, *rows = table(section((run / "report.md").read_text(), "The model as released"))
    assert header[0] == "defense" and "extraction (share of members above null)" in header and [r[0] for r in rows] == changed["defenses"]
    baseline = [v for v in verdicts_of(changed) if v.check.startswith("baseline_")]
    assert baseline and all("-pretrained-" in v.cell_id for v in baseline)
    pooled = next(c for c in changed["cells"] if c["id"] == "none-pretrained-loss-all")
    tpr = pooled["metrics"]["tpr_at_1pct_fpr"]
    assert rows[0][header.index("loss (TPR at 1% FPR)")].startswith(f"{tpr['value']:.3f} [{tpr['ci95'][0]:.3f}")
    extracted = next(c for c in changed["cells"] if c["id"] == "none-pretrained-extraction-all")["metrics"]["extracted"]
    assert rows[0][header.index("extraction (share of members above null)")].startswith(f"{extracted} extracted")  # the fixture predates the null


EVIL = "<script>alert(1)</script>](javascript:alert(2))"


class Page(Tags):
    def __init__(self):
        super().__init__()
        self.text = ""

    def handle_data(self, data):
        self.text += data


def test_user_text_is_shown_not_obeyed_in_both_reports(tmp_path, results):
    """A domain name, caption and config path come from the user's data and config: with markup in
    them, report.html holds no script or link and report.md no HTML, link or image of theirs -
    both show the text itself."""
    from markdown_it import MarkdownIt

    evil = json.loads(json.dumps(results).replace('"digit7', json.dumps(EVIL)[:-1]))
    evil["config"]["attack"]["domains"] = [EVIL, "digit8"]
    evil["config"]["run"]["data"] = str(tmp_path / "the user's data")  # its domains are not the testbed's
    evil["config"]["testbed"]["caption"] = EVIL + " {name}"
    evil["config_source"] = "/tmp/" + EVIL + ".toml"
    run, _ = write(tmp_path, evil)

    page = Page()
    page.feed((run / "report.html").read_text())
    assert EVIL in page.text  # shown as text
    assert not [t for t, a in page.tags if t == "script" or any("javascript" in (v or "") for v in a.values())]

    markdown = (run / "report.md").read_text()
    md = MarkdownIt("commonmark")  # raw HTML on, as on most renderers
    md.validateLink = lambda url: True  # judge the Markdown itself, not this renderer's link filter
    tokens = [t for block in md.parse(markdown) for t in [block, *(block.children or [])]]
    assert not [t for t in tokens if t.type in ("html_inline", "html_block", "link_open")]
    assert all(t.attrGet("src").endswith(".png") for t in tokens if t.type == "image")
    shown = "".join(t.content for t in tokens if t.type in ("text", "code_inline"))
    assert EVIL in shown

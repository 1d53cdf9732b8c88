"""What the docs give readers to copy works: the CI recipes of docs/gates.md parse and run the gates."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def yaml_blocks(path: Path) -> list[dict]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)]


def test_the_ci_recipes_parse_and_keep_the_report_and_the_junit_file():
    github, gitlab = yaml_blocks(ROOT / "docs" / "gates.md")
    steps = github["jobs"]["gates"]["steps"]
    commands = " ".join(step.get("run", "") for step in steps)
    assert "pytest suites/ --s2l-config configs/release.toml" in commands and "--junitxml gates.xml" in commands
    kept = next(step for step in steps if step.get("uses", "").startswith("actions/upload-artifact"))
    assert kept["if"] == "always()" and {"gates.xml", "gate-run/report.html"} <= set(kept["with"]["path"].split())
    job = gitlab["release-gates"]
    assert any("pytest suites/ --s2l-config configs/release.toml" in line for line in job["script"])
    assert {"gates.xml", "gate-run/report.html"} <= set(job["artifacts"]["paths"]) and job["artifacts"]["reports"]["junit"] == "gates.xml"
    for recipe in (commands, " ".join(job["script"])):  # the options they pass are the suite's own
        options = set(re.findall(r"--s2l-[a-z-]+", recipe))
        assert options <= set(re.findall(r'"(--s2l-[a-z-]+)"', (ROOT / "suites" / "conftest.py").read_text()))


def test_table_diff_finds_every_entry_that_differs_from_the_published_table(tmp_path):
    """docs/calibration/table_diff.py, the reproduction check of docs/standard-table.md."""
    script = ROOT / "docs" / "calibration" / "table_diff.py"
    published = (ROOT / "docs" / "standard-table.md").read_text()
    table = published[published.index("## The table") :]
    same = tmp_path / "same.md"
    same.write_text(table)
    out = subprocess.run([sys.executable, str(script), str(same)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("432 of 432 published entries agree")
    changed = tmp_path / "changed.md"
    changed.write_text(table.replace("| -0.033 [-0.055, -0.013], p=0.00 |", "| -0.034 [-0.055, -0.013], p=0.00 |", 1))
    out = subprocess.run([sys.executable, str(script), str(changed)], capture_output=True, text=True)
    assert out.returncode == 1 and "431 of 432" in out.stdout and "lora / dAUC vs pre-trained" in out.stdout


def test_the_recorded_parts_of_the_5_seed_standard_matrix_merge_into_it():
    """docs/records/standard-5seeds: each part is a valid results.json of configs/standard-5seeds.toml
    (its config unchanged since), and the parts of each group of defenses merge into its matrix over
    the seeds recorded, and all of them into the whole (docs/gates.md, "Stable verdicts")."""
    import json

    import jsonschema

    from s2l_guard.config import load_config
    from s2l_guard.runner.matrix import load_matrix
    from s2l_guard.runner.merge import merge_matrices

    schema = json.loads((ROOT / "docs" / "results.schema.json").read_text())
    parts = {path.name: load_matrix(path) for path in sorted((ROOT / "docs" / "records" / "standard-5seeds").glob("*.json"))}
    assert parts
    for part in parts.values():
        jsonschema.validate(part, schema)
    config = load_config(str(ROOT / "configs" / "standard-5seeds.toml"))
    groups = {tuple(p["defenses"]) for p in parts.values()}  # the defenses run together; each group is merged over its seeds
    for defenses in groups:
        mine = {name: p for name, p in parts.items() if tuple(p["defenses"]) == defenses}
        seeds = sorted(s for p in mine.values() for s in p["seeds"])
        merged = merge_matrices(config.replace(matrix={"replicates": seeds, "defenses": list(defenses)}), mine)
        assert len(merged["cells"]) == sum(len(p["cells"]) for p in mine.values())
    whole = merge_matrices(config, parts)  # all ten parts are in: the config's own matrix, nothing left out
    assert sorted(whole["seeds"]) == list(config.matrix.replicates) and set(whole["defenses"]) == set(config.matrix.defenses)
    assert len(whole["cells"]) == sum(len(p["cells"]) for p in parts.values())

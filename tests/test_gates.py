"""The release gates end to end: `pytest suites/` in a subprocess on tiny smoke-profile matrices.

Every run shares one artifact store, so the model and the cells are computed once. The smoke
model is trained on 12 members and 12 non-members per digit here (24 vs 24 pooled resolve an AUC
change of 0.097: `s2l-guard config check`). The leaking attack is the oracle row (End-to-End
fine-tuned hard on the real members), which raises the loss attack's AUC on the undefended smoke
model for real (about +0.34 [+0.17, +0.48]); Gaussian shaking with sigma 0 changes nothing, so it
cannot leak.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from s2l_guard.results import GateCell

pytestmark = pytest.mark.slow  # gate suites in subprocesses on smoke matrices (about 2 minutes)

ROOT = Path(__file__).resolve().parents[1]

CRASHING_PLUGIN = """
from dataclasses import dataclass
from attacks.base import SHAKERS, Shaker

@SHAKERS.register
class Crashing(Shaker):
    name = "crashing"
    paper = "none: a test plugin"
    summary = "raises while fine-tuning"

    @dataclass(frozen=True)
    class Settings:
        steps: int = 1

    def shake(self, bundle, data, *, seed, callback=None, callback_every=0):
        raise RuntimeError("the crashing plugin crashed on purpose")


from attacks.finetune.end2end import EndToEnd

@SHAKERS.register
class CrashesOnEight(EndToEnd):
    name = "crashes_on_eight"
    summary = "End-to-End, except that it crashes on the digit eight"

    def shake(self, bundle, data, **kwargs):
        if "eight" in data.prompt:
            raise RuntimeError("crashed on the digit eight on purpose")
        return super().shake(bundle, data, **kwargs)
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gates")
    (folder / "crash_plugin.py").write_text(CRASHING_PLUGIN)
    return folder


def write_config(folder: Path, name: str, *, matrix: str, gates: str, attack: str = "") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(f"""
extends = "{ROOT / "configs" / "smoke.toml"}"
[run]
store = "{folder / "store"}"
out_dir = "{folder / "runs"}"
device = "cpu"
[testbed]
members_per_domain = 12
nonmembers_per_domain = 12
[attack]
mia = ["loss"]
{attack}
[shakers.end2end]
steps = 300
batch_size = 6
learning_rate = 1e-3
[matrix]
{matrix}
[gates]
{gates}
""")
    return path


LEAKY = 'defenses = ["none"]\nshakers = []\nmember_shakers = ["end2end"]\ngaussian_sigmas = []'
# An attack that cannot amplify anything (Gaussian shaking with sigma 0: delta exactly 0) beside the leaking oracle row.
QUIET = 'defenses = ["none"]\nshakers = []\nmember_shakers = ["end2end"]\ngaussian_sigmas = [0.0]'


def run_suite(folder: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(folder), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    command = [sys.executable, "-m", "pytest", str(ROOT / "suites"), "-p", "no:cacheprovider", "-q", "-rA", f"--s2l-config={config}", *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def outcomes(junit: Path) -> dict[str, str]:
    """Test id -> passed / failure / error / skipped, from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        out[case.get("name")] = kinds[0] if kinds else "passed"
    return out


@pytest.fixture(scope="module")
def tight(workspace):
    """The undefended smoke model under a 0.1 AUC-amplification threshold: (process, JUnit report)."""
    config = write_config(
        workspace, "tight", matrix=LEAKY, gates='checks = ["auc_amplification", "utility"]\nmax_auc_amplification = 0.1\nmin_utility = 0.0'
    )
    junit = workspace / "tight.xml"
    return run_suite(workspace, config, f"--junitxml={junit}"), junit


def test_undefended_model_fails_tight_amplification_gates(workspace, tight):
    result, junit = tight
    assert result.returncode == 1, result.stdout[-3000:]
    seen = outcomes(junit)
    assert seen["test_amplification[none-end2end-members-loss-all]"] == "failure"
    assert seen["test_utility[none-utility]"] == "passed"
    # the failure message names the cell, the measurement with its interval, and the threshold
    message = next(line for line in result.stdout.splitlines() if "none-end2end-members-loss-all: AUC amplification" in line)
    assert "[95% CI" in message and "maximum 0.1" in message and "max_auc_amplification" in message
    results = json.loads(next((workspace / "runs").glob("tight-matrix-*/results.json")).read_text())
    pooled = next(c for c in results["cells"] if c["id"] == "none-end2end-members-loss-all")
    assert pooled["metrics"]["auc_amplification"]["ci95"][0] > 0.1  # the favourable end is beyond the threshold: a FAIL
    assert results["blind"]["0"]["all"]["fires"] is False  # the testbed's split is i.i.d.: the blind baseline stays silent


def test_an_interval_across_the_threshold_is_undecided_and_says_what_would_decide_it(workspace, tight):
    config = write_config(workspace, "straddle", matrix=LEAKY, gates='checks = ["auc_amplification"]\nmax_auc_amplification = 0.3')
    junit = workspace / "straddle.xml"
    result = run_suite(workspace, config, f"--junitxml={junit}")
    assert result.returncode == 1 and outcomes(junit)["test_amplification[none-end2end-members-loss-all]"] == "error", result.stdout[-3000:]
    assert "UNDECIDED: none-end2end-members-loss-all: AUC amplification" in result.stdout and "straddles the maximum 0.3" in result.stdout
    assert "would be decided by at least 2 draws" in result.stdout and "mode compare: 0 pass, 0 fail, 1 undecided" in result.stdout


def test_loose_thresholds_pass_and_k_selects(workspace):
    config = write_config(
        workspace, "loose", matrix=LEAKY, gates='checks = ["auc_amplification", "utility"]\nmax_auc_amplification = 1.0\nmin_utility = 0.0'
    )
    result = run_suite(workspace, config)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "failed" not in result.stdout.splitlines()[-1] and "passed" in result.stdout.splitlines()[-1]
    selected = run_suite(workspace, config, "-k", "utility", "--s2l-reuse", f"--s2l-run-dir={next((workspace / 'runs').glob('loose-matrix-*'))}")
    assert selected.returncode == 0
    assert "1 passed" in selected.stdout and "test_amplification" not in selected.stdout.replace("deselected", "")


def test_k_selects_one_defense_and_runs_only_it(workspace):
    config = write_config(workspace, "subset", matrix='defenses = ["none", "dp_sgd", "output_filter"]\nshakers = []\nmember_shakers = []\ngaussian_sigmas = []',
                          gates='checks = ["utility"]\nmin_utility = 0.0')  # fmt: skip
    result = run_suite(workspace, config, "-k", "dp_sgd")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "test_utility[dp_sgd-utility]" in result.stdout and re.match(r"1 passed, \d+ deselected", result.stdout.splitlines()[-1])
    (folder,) = (workspace / "runs").glob("subset-matrix-*")
    assert folder.name.endswith("-dp_sgd")  # a subset never overwrites the whole matrix's folder
    assert json.loads((folder / "results.json").read_text())["defenses"] == ["dp_sgd"]  # utility gates need no control


def test_control_that_cannot_leak_leaves_every_gate_undecided(workspace):
    config = write_config(workspace, "insensitive", matrix='defenses = ["none"]\nshakers = []\nmember_shakers = []\ngaussian_sigmas = [0.0]',
                          gates='checks = ["auc_amplification"]\nmax_auc_amplification = 1.0')  # fmt: skip
    junit = workspace / "insensitive.xml"
    result = run_suite(workspace, config, f"--junitxml={junit}")
    assert result.returncode != 0
    gated = {name: outcome for name, outcome in outcomes(junit).items() if name.startswith("test_amplification")}
    assert len(gated) == 2 and set(gated.values()) == {"error"}, gated  # 2 Gaussian rows, pooled; loose, yet none passes
    assert "UNDECIDED" in result.stdout and "cannot tell a safe model from an insensitive test" in result.stdout


def test_crashing_cell_is_reported_failed_with_its_error(workspace):
    config = write_config(workspace, "crash", matrix='defenses = ["none"]\nshakers = ["crashing"]\nmember_shakers = []\ngaussian_sigmas = []',
                          gates='checks = ["auc_amplification"]\nmax_auc_amplification = 1.0')  # fmt: skip
    junit = workspace / "crash.xml"
    result = run_suite(workspace, config, "-p", "crash_plugin", f"--junitxml={junit}")
    assert result.returncode == 1, result.stdout[-3000:]
    seen = outcomes(junit)
    assert seen["test_amplification[none-crashing-loss-all]"] == "failure"
    assert "RuntimeError: the crashing plugin crashed on purpose" in result.stdout
    results = json.loads(next((workspace / "runs").glob("crash-matrix-*/results.json")).read_text())
    crashed = [c for c in results["cells"] if c["attack"] == "crashing"]
    assert crashed and all(c["status"] == "failed" and "crashed on purpose" in c["reason"] for c in crashed)


def test_results_json_follows_the_documented_schema(workspace, tight):
    import jsonschema

    schema = json.loads((ROOT / "docs" / "results.schema.json").read_text())
    for path in (workspace / "runs").glob("*-matrix-*/results.json"):
        results = json.loads(path.read_text())
        jsonschema.validate(results, schema)
        assert results["code_version"].startswith(results["s2l_guard_version"])
        # the typed cells read and write every real cell back as it was, key order included
        assert [json.dumps(GateCell.from_dict(c).to_dict()) for c in results["cells"]] == [json.dumps(c) for c in results["cells"]]
    broken = json.loads(next((workspace / "runs").glob("tight-matrix-*/results.json")).read_text())
    broken["cells"][0]["status"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_release_config_gates_a_model_folder_from_the_command_line(workspace, tight):
    bundle = next(p.parent for p in (workspace / "store" / "bundle").glob("*/model_index.json"))  # the smoke model tight trained
    model = workspace / "my-model"
    shutil.copytree(bundle, model, ignore=shutil.ignore_patterns("s2l-artifact.json", "training.json"))
    config = write_config(workspace, "release", matrix=LEAKY, gates='checks = ["auc_amplification"]\nmax_auc_amplification = 0.1')
    result = run_suite(workspace, config, f"--s2l-model={model}")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "none-end2end-members-loss-all: AUC amplification" in result.stdout
    results = json.loads(next((workspace / "runs").glob("release-matrix-*/results.json")).read_text())
    assert results["config"]["run"]["model"] == str(model) and results["tables"]["none/0"]["artifacts"]["bundle"] == str(model)
    # a model folder of the wrong shape stops the session with the loader's one-line error
    broken = workspace / "broken-model"
    shutil.copytree(model, broken)
    (broken / "model_index.json").unlink()
    stopped = run_suite(workspace, config, f"--s2l-model={broken}")
    assert stopped.returncode == 1 and "model_index.json" in stopped.stdout and "passed" not in stopped.stdout.splitlines()[-1]
    # a pre-training defense cannot be applied to a finished model: a usage error before anything runs
    recipe = write_config(workspace, "release-dp", matrix='defenses = ["none", "dp_sgd"]', gates="")
    refused = run_suite(workspace, recipe, f"--s2l-model={model}")
    assert refused.returncode == 4 and "dp_sgd, a pre-training recipe" in refused.stderr and "Traceback" not in refused.stderr


def test_a_shifted_split_keeps_every_mia_gate_from_passing(workspace, tight):
    """The same model and members, its non-members blurred: a blind baseline tells them apart
    without the model, so the gates that pass on the i.i.d. split are UNDECIDED here."""
    from PIL import Image, ImageFilter

    bundle = next(p.parent for p in (workspace / "store" / "bundle").glob("*/model_index.json"))
    model = workspace / "shift-model"
    shutil.copytree(bundle, model, ignore=shutil.ignore_patterns("s2l-artifact.json", "training.json"))
    testbed = next(p.parent for p in (workspace / "store" / "testbed").glob("*/metadata.jsonl"))
    data = workspace / "shifted-data"
    shutil.copytree(testbed, data, ignore=shutil.ignore_patterns("s2l-artifact.json"))
    for row in map(json.loads, (data / "metadata.jsonl").read_text().splitlines()):
        if row["membership"] == "nonmember":
            path = data / row["file_name"]
            Image.open(path).filter(ImageFilter.GaussianBlur(1)).save(path)
    config = write_config(workspace, "shifted", matrix=QUIET, gates='mode = "release"\nchecks = ["auc_amplification"]\nmax_auc_amplification = 0.1')
    junit = workspace / "shifted.xml"
    result = run_suite(workspace, config, f"--s2l-model={model}", f"--s2l-data={data}", f"--junitxml={junit}")
    gated = {k: v for k, v in outcomes(junit).items() if k.startswith("test_amplification")}
    assert result.returncode == 1 and set(gated.values()) == {"error"}, result.stdout[-3000:]
    assert "members and non-members differ without the model (blind AUC" in result.stdout
    results = json.loads(next((workspace / "runs").glob("shifted-matrix-*/results.json")).read_text())
    assert results["blind"]["0"]["all"]["fires"] and results["blind"]["0"]["all"]["ci95"][0] > 0.55


def release_gates(workspace: Path, name: str, gates: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """The QUIET matrix (one shared results folder: [gates] is not in its hash) under release-mode gates."""
    config = write_config(workspace, name, matrix=QUIET, gates=f'mode = "release"\nchecks = ["auc_amplification"]\n{gates}')
    junit = workspace / f"{name}.xml"
    result = run_suite(workspace, config, f"--junitxml={junit}")
    return result, {k: v for k, v in outcomes(junit).items() if k.startswith("test_amplification")}


def test_release_mode_passes_a_model_s2l_does_not_amplify_when_its_oracle_row_shows_the_instrument_sees(workspace):
    result, seen = release_gates(workspace, "release-pass", "max_auc_amplification = 0.1")
    assert result.returncode == 0, result.stdout[-3000:]
    assert len(seen) == 2 and set(seen.values()) == {"passed"}, seen  # 2 Gaussian rows, pooled; the oracle row is the control
    assert "s2l-guard gates" in result.stdout and "mode release: 2 pass, 0 fail, 0 undecided, 0 skip" in result.stdout
    assert "report: " in result.stdout and "report.html" in result.stdout
    compare = write_config(workspace, "compare-quiet", matrix=QUIET, gates='checks = ["auc_amplification"]\nmax_auc_amplification = 0.1')
    assert run_suite(workspace, compare).returncode == 1  # the same matrix cannot be judged when S2L itself must leak


def test_release_mode_cannot_judge_a_model_on_which_its_oracle_row_shows_nothing(workspace):
    # the oracle row raises the loss attack's AUC by about +0.34 [+0.17, +0.48], and the released model's AUC
    # interval holds 0.5: demand a control above 0.5 and nothing shows the measure can see membership
    result, seen = release_gates(workspace, "release-blind", "max_auc_amplification = 1.0\ncontrol_min_amplification = 0.5")
    assert result.returncode == 1 and set(seen.values()) == {"error"}, seen
    assert "the instrument cannot see membership on this model" in result.stdout and "end2end-members" in result.stdout


def test_release_mode_takes_the_calibrated_control_row_as_its_control(workspace):
    # no oracle rows: End-to-End on the real members at the control's own budget is the only control
    matrix = 'defenses = ["none"]\nshakers = []\nmember_shakers = []\ngaussian_sigmas = [0.0]'
    control = "control_steps = 300\ncontrol_learning_rate = 1e-3"
    gates = 'mode = "release"\nchecks = ["auc_amplification"]\nmax_auc_amplification = 0.1'
    junit = workspace / "control.xml"
    result = run_suite(workspace, write_config(workspace, "control", matrix=matrix, attack=control, gates=gates), f"--junitxml={junit}")
    assert result.returncode == 0, result.stdout[-3000:]
    seen = {k: v for k, v in outcomes(junit).items() if k.startswith("test_amplification")}
    assert len(seen) == 2 and set(seen.values()) == {"passed"}, seen  # the Gaussian rows; the control row is not gated
    strict = write_config(workspace, "control-strict", matrix=matrix, attack=control, gates=gates + "\ncontrol_min_amplification = 0.9")
    result = run_suite(workspace, strict)
    assert result.returncode == 1 and "its calibrated control end2end-control" in result.stdout, result.stdout[-3000:]


def test_a_domain_that_crashes_fails_the_pooled_gate_instead_of_vanishing_from_it(workspace):
    config = write_config(workspace, "half", matrix='defenses = ["none"]\nshakers = ["crashes_on_eight"]\nmember_shakers = ["end2end"]\ngaussian_sigmas = []',
                          gates='mode = "release"\nchecks = ["auc_amplification"]\ndomains = "pooled"\nmax_auc_amplification = 1.0')  # fmt: skip
    junit = workspace / "half.xml"
    result = run_suite(workspace, config, "-p", "crash_plugin", f"--junitxml={junit}")
    assert result.returncode == 1, result.stdout[-3000:]
    assert outcomes(junit)["test_amplification[none-crashes_on_eight-loss-all]"] == "failure"
    assert "digit8 failed (RuntimeError: crashed on the digit eight on purpose)" in result.stdout


def test_draws_run_apart_and_merged_are_the_whole_runs_cells_and_one_pooled_verdict(workspace):
    """A matrix under draws 0 and 1, and the same draws run one at a time in a store of their
    own, then merged (`matrix --merge`): the same cells, and the gate suite judges both alike,
    one gate per cell pooling both draws."""
    from s2l_guard.cli import main

    gates = 'checks = ["auc_amplification", "utility"]\nmax_auc_amplification = 1.0\nmin_utility = 0.0'
    whole = write_config(workspace, "draws", matrix=LEAKY + "\ndraws = [0, 1]", gates=gates)
    apart = workspace / "apart"
    apart.mkdir()
    for seed in (0, 1):
        part = write_config(apart, f"draw{seed}", matrix=LEAKY + f"\ndraws = [{seed}]", gates=gates)
        assert main(["matrix", "--config", str(part), "--out", str(apart / f"part{seed}")]) == 0
    assert main(["matrix", "--config", str(whole), "--out", str(workspace / "whole")]) == 0
    parts = [str(apart / "part0"), str(apart / "part1" / "results.json")]  # a run folder or its results.json
    assert main(["matrix", "--config", str(whole), "--merge", *parts, "--out", str(workspace / "merged")]) == 0
    read = lambda name: json.loads((workspace / name / "results.json").read_text())  # noqa: E731
    untimed = lambda cells: [{k: v for k, v in c.items() if k not in ("seconds", "cached")} for c in cells]  # noqa: E731
    merged = read("merged")
    assert untimed(merged["cells"]) == untimed(read("whole")["cells"])
    assert [p["draws"] for p in merged["parts"]] == [[0], [1]]
    assert {c.get("draw", 0) for c in merged["cells"]} == {0, 1} and merged["tables"]["none/0/draw1"]["status"] == "ok"
    verdicts = {}
    for name in ("whole", "merged"):
        junit = workspace / f"{name}.xml"
        result = run_suite(workspace, whole, "--s2l-reuse", f"--s2l-run-dir={workspace / name}", f"--junitxml={junit}")
        assert result.returncode == 0, result.stdout[-3000:]
        verdicts[name] = outcomes(junit)
    assert verdicts["merged"] == verdicts["whole"] and "test_amplification[none-end2end-members-loss-all]" in verdicts["whole"]
    from s2l_guard.gates import evaluate
    from s2l_guard.runner.matrix import config_of
    from s2l_guard.runner.plan import plan

    config = config_of(merged)
    [oracle] = [v for v in evaluate(merged, config.gates, plan(config)) if v.cell_id == "none-end2end-members-loss-all"]
    assert oracle.measurement.draws == 2 and "mean of 2 draws" in oracle.message

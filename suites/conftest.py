"""Release gates: options, the matrix as a session fixture, one parametrized test per gate and cell.

    pytest suites/ --s2l-config configs/release.toml [--s2l-model my-model/] [--junitxml gates.xml]

Cells are planned from the config alone (nothing runs at collection), so ``-k dp_sgd``
selects one defense; the session fixture then runs (or, with ``--s2l-reuse``, loads)
only the selected defenses plus the undefended model the positive controls need.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from s2l_guard.config import Config
from s2l_guard.decision import Outcome
from s2l_guard.gates import gate_plan, judge
from s2l_guard.runner.plan import PlannedCell, plan

PROFILES = Path(__file__).resolve().parents[1] / "configs"
# each gate test and the [gates] check it runs
CHECK_OF_TEST = {"test_amplification": "auc_amplification", "test_tpr_at_1pct_fpr": "tpr_at_1pct_fpr",
                 "test_extraction": "extracted", "test_utility": "utility",
                 "test_baseline_tpr_at_1pct_fpr": "baseline_tpr_at_1pct_fpr", "test_baseline_extraction": "baseline_extracted"}  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("s2l", "s2l-guard release gates")
    group.addoption("--s2l-config", help="TOML config with [matrix] and [gates] (default: the --s2l-profile profile)")
    group.addoption("--s2l-profile", default="standard", help="a shipped profile: smoke, quick, standard, release (default: standard)")
    group.addoption("--s2l-device", choices=("auto", "cpu", "cuda", "mps"), help="override [run] device")
    group.addoption("--s2l-model", help="gate this diffusers model folder instead of the testbed model (sets [run] model)")
    group.addoption("--s2l-data", help="its labelled data set: an imagefolder with metadata.jsonl (sets [run] data)")
    group.addoption("--s2l-run-dir", help="where results.json and the report go (default: runs/<profile>-matrix-<hash>)")
    group.addoption("--s2l-reuse", action="store_true", help="judge the results.json already in the run directory; run nothing")


def s2l_config(pytestconfig: pytest.Config) -> Config:
    """The resolved config of this session (read once; a broken file stops collection with its problems)."""
    cached = getattr(pytestconfig, "_s2l_config", None)
    if cached is not None:
        return cached
    from s2l_guard.cli import apply_model_options
    from s2l_guard.config import load_config
    from s2l_guard.errors import S2LError

    option = pytestconfig.getoption
    path = option("--s2l-config") or PROFILES / f"{option('--s2l-profile')}.toml"
    try:
        config = load_config(path)
        if option("--s2l-device"):
            config = config.replace(run={"device": option("--s2l-device")})
        config = apply_model_options(config, option("--s2l-model"), option("--s2l-data"))
        pytestconfig._s2l_plan = plan(config)  # a matrix that cannot run is a usage error, before collection
    except S2LError as exc:
        raise pytest.UsageError(f"s2l-guard: {exc}") from None
    from s2l_guard.resolution import refusals

    refused = refusals(config)  # a threshold no safe model can pass measures nothing: refuse it before anything runs
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise pytest.UsageError(f"s2l-guard: {refused[0]}{more}; `s2l-guard config check --config {path}` lists each gate's resolution")
    pytestconfig._s2l_config = config
    return config


def pytest_configure(config: pytest.Config) -> None:
    s2l_config(config)
    config._s2l_verdicts = []  # (planned cell, verdict) of every gate judged, for the summary


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The verdict a person reads at the end: defense x attack, the worst verdict of each tile."""
    from s2l_guard.gates import summary_lines

    judged = getattr(config, "_s2l_verdicts", [])
    if not judged:
        return
    terminalreporter.section("s2l-guard gates")
    for line in summary_lines(judged, s2l_config(config).gates.mode):
        terminalreporter.write_line(line)
    folder = getattr(config, "_s2l_folder", None)
    if folder is not None and (Path(folder) / "report.html").is_file():
        terminalreporter.write_line(f"report: {Path(folder) / 'report.html'}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    check = CHECK_OF_TEST.get(metafunc.function.__name__)
    if check is None or "gate" not in metafunc.fixturenames:
        return
    config = s2l_config(metafunc.config)
    cells = gate_plan(metafunc.config._s2l_plan, config.gates, check)
    if not cells:  # say why, rather than pytest's "empty parameter set"
        why = f"[gates] checks leaves out {check}" if check not in config.gates.checks else f"no cell of the matrix has a {check} gate"
        metafunc.parametrize("gate", [pytest.param(None, marks=pytest.mark.skip(reason=why))], ids=["not-gated"])
        return
    metafunc.parametrize("gate", cells, ids=[c.gate_id for c in cells])


@pytest.fixture(scope="session")
def s2l_matrix(request: pytest.FixtureRequest) -> dict:
    """The measured matrix: run for the selected gates' defenses (and none, for the controls), or loaded."""
    from s2l_guard.results import cells_by_key
    from s2l_guard.runner.matrix import load_matrix, matrix_folder, run_matrix, write_matrix

    config = s2l_config(request.config)
    given = request.config.getoption("--s2l-run-dir")
    if request.config.getoption("--s2l-reuse"):
        folder = Path(given or matrix_folder(config))
        results = load_matrix(folder)
    else:
        params = [getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items]
        selected = [p["gate"] for p in params if isinstance(p.get("gate"), PlannedCell)]
        needed = {cell.defense for cell in selected} | ({"none"} if any(c.measure != "utility" for c in selected) else set())
        defenses = [d for d in config.matrix.defenses if d in needed] or ["none"]
        folder = Path(given or matrix_folder(config))
        if not given and len(defenses) < len(config.matrix.defenses):  # a -k subset must not overwrite the whole matrix
            folder = folder.with_name(f"{folder.name}-{'+'.join(defenses)}")
        results = run_matrix(config, defenses)
        write_matrix(results, folder)
        from s2l_guard.report import write_report

        write_report(folder)
    request.config._s2l_folder = folder
    return {"results": results, "cells": cells_by_key(results), "folder": folder}


@pytest.fixture
def judged(gate: PlannedCell, s2l_matrix: dict, pytestconfig: pytest.Config, request: pytest.FixtureRequest):
    """The gate's verdict, every replicate and draw pooled: PASS passes, FAIL fails, UNDECIDED
    errors here, at setup (pytest's ERROR: not judged either way), SKIP skips."""
    gates = s2l_config(pytestconfig).gates
    v = judge(CHECK_OF_TEST[request.node.originalname], gate, s2l_matrix["cells"], gates, s2l_matrix["results"].get("blind"))
    pytestconfig._s2l_verdicts.append((gate, v))
    if v.outcome == Outcome.SKIP:  # a cell that did not run is never passed
        pytest.skip(v.message)
    if v.outcome == Outcome.UNDECIDED:  # failing in a fixture makes pytest report an error, not a failure
        pytest.fail(f"UNDECIDED: {v.message}", pytrace=False)
    return v

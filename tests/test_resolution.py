"""What a profile's gates can resolve, and the refusal of thresholds no safe model can pass."""

import subprocess
import sys
from pathlib import Path

import pytest

from s2l_guard.cli import main
from s2l_guard.config import load_config
from s2l_guard.decision import Outcome, decide, pool_draws
from s2l_guard.resolution import K_AUC, refusals, resolutions, sample_sizes

ROOT = Path(__file__).resolve().parents[1]


def profile(tmp_path: Path, gates: str, extends: str = "standard.toml", matrix: str = "") -> Path:
    path = tmp_path / "profile.toml"
    path.write_text(f'extends = "{ROOT / "configs" / extends}"\n[matrix]\n{matrix}\n[gates]\n{gates}\n')
    return path


def test_the_shipped_release_and_standard_profiles_are_passable_by_a_model_that_leaks_nothing():
    for name in ("release", "standard"):
        config = load_config(ROOT / "configs" / f"{name}.toml")
        assert refusals(config) == [], name
    release = {(r.check, r.scope): r for r in resolutions(load_config(ROOT / "configs" / "release.toml"))}
    auc = release["auc_amplification", "pooled"]
    assert (auc.members, auc.nonmembers, auc.draws) == (200, 200, 3) and 0.03 < auc.resolution < 0.05
    assert release["extracted", "pooled"].resolution == pytest.approx(1 - 0.025 ** (1 / 200))  # 0 of 200: 0.018


def test_a_threshold_below_the_resolution_is_refused_with_the_sample_that_would_pass_it(tmp_path):
    config = load_config(profile(tmp_path, 'domains = "each"\nmax_auc_amplification = 0.05'))
    [problem] = [p for p in refusals(config) if "max_auc_amplification" in p]
    assert "40 members vs 40 non-members, 1 draw(s) resolve 0.075" in problem and "gate the pooled cell only" in problem
    needed = int(problem.split("or use about ")[1].split(" members")[0])
    assert needed > 40
    sizes = {"testbed": {"members_per_domain": needed, "nonmembers_per_domain": needed}}
    assert not [p for p in refusals(config.replace(**sizes)) if "max_auc_amplification" in p]  # that sample makes it passable
    assert [p for p in refusals(load_config(profile(tmp_path, "max_extracted_share = 0.0"))) if "max_extracted_share" in p]


def test_the_resolution_is_what_a_simulated_zero_leakage_model_passes_80_percent_of_the_time():
    """The variance model's resolution, checked against simulated audits of a model that leaks
    nothing, with the standard error the model assumes: a threshold at the resolution passes
    about 80% of them."""
    import numpy as np
    from test_decision import simulated_draws

    config = load_config(ROOT / "configs" / "release.toml")
    r = next(r for r in resolutions(config) if r.check == "auc_amplification")
    se = K_AUC * (1 / r.members + 1 / r.nonmembers) ** 0.5
    rng = np.random.default_rng(0)
    passed = sum(decide(pool_draws(simulated_draws(rng, truth=0.0, draws=3, within=se, between=se)), r.resolution)[0] == Outcome.PASS
                 for _ in range(1000))  # fmt: skip
    assert 0.72 <= passed / 1000 <= 0.88


def test_config_check_prints_the_table_and_exits_1_on_a_refused_threshold(tmp_path, capsys):
    assert main(["config", "check", "--config", str(ROOT / "configs" / "release.toml")]) == 0
    out = capsys.readouterr().out
    assert "auc_amplification" in out and "200 vs 200" in out and "variance model" in out and "refused" not in out
    assert main(["config", "check", "--config", str(profile(tmp_path, 'domains = "both"'))]) == 1
    assert "refused: [gates] max_auc_amplification = 0.05" in capsys.readouterr().out


def test_the_gate_suite_refuses_an_unpassable_threshold_at_collection_with_one_line(tmp_path):
    config = profile(tmp_path, 'domains = "each"', matrix='defenses = ["none"]')
    done = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "suites"), "-p", "no:cacheprovider", "--collect-only", "-q",
                           f"--s2l-config={config}"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]  # pytest's usage error: nothing ran
    [line] = [x for x in done.stderr.splitlines() if "s2l-guard:" in x]
    assert "cannot be passed by a model that leaks nothing" in line and "s2l-guard config check" in line


def test_a_given_data_set_sizes_the_gates_from_its_metadata(tmp_path):
    from s2l_guard.testbed import build_testbed

    config = load_config(ROOT / "configs" / "smoke.toml")
    build_testbed(tmp_path / "data", config.testbed, 0)
    given = config.replace(run={"data": str(tmp_path / "data")})
    assert sample_sizes(given) == (config.testbed.members_per_domain, config.testbed.nonmembers_per_domain, 2)

"""The epsilon frontier: its parsing, DP at epsilon inf, the table's reading of the points, the
figure, and one smoke sweep end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_privacy import run

from s2l_guard.config import load_config
from s2l_guard.errors import SettingsError
from s2l_guard.runner.sweep import comeback_lines, epsilon_config, format_sweep, parse_epsilons, plot_sweep
from s2l_guard.testing import tiny_bundle

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


def test_epsilons_parse_with_inf_and_bad_lists_are_one_line_errors():
    assert parse_epsilons("1, 3,10,inf") == (1.0, 3.0, 10.0, math.inf)
    for bad in ("", "1,x", "0,1", "-3"):
        with pytest.raises(SettingsError, match="--epsilons"):
            parse_epsilons(bad)


def test_an_epsilon_point_keeps_the_defenses_other_settings_and_survives_toml():
    config = load_config(SMOKE).replace(defenses={"private_finetune": {"steps": 7}})
    point = epsilon_config(config, "private_finetune", math.inf)
    assert point.defenses["private_finetune"] == {"steps": 7, "target_epsilon": math.inf}
    assert "target_epsilon = inf" in point.to_toml()


@pytest.mark.filterwarnings("ignore")
def test_dp_at_epsilon_inf_clips_but_adds_no_noise_and_says_so():
    result = run(tiny_bundle(), steps=2, epsilon=math.inf)
    assert result.noise_multiplier == 0.0 and math.isinf(result.epsilon)


def _point(defense, epsilon, auc, change, accuracy):
    interval = lambda v, w: {"value": v, "ci95": [v - w, v + w]}  # noqa: E731
    return {"defense": defense, "target_epsilon": epsilon, "status": "ok", "epsilon": epsilon, "noise_multiplier": 1.0, "steps": 10,
            "empirical_epsilon": {"secmi": 0.1}, "accuracy": {"private": interval(accuracy, 0.05), "public": interval(0.9, 0.05)},
            "frechet_distance": 5.0, "released": {"secmi": {"auc": interval(auc, 0.04), "tpr_at_1pct_fpr": interval(0.02, 0.02)}},
            "extraction_above_null": interval(0.0, 1.0), "amplification": {"end2end": {"secmi": interval(change, 0.01), "extraction": None}},
            "wall_seconds": 1.0}  # fmt: skip


def _results(points):
    return {"defenses": ["dp_sgd"], "mia": ["secmi"], "shakers": ["end2end"], "points": points, "interval": "95%"}


def test_the_table_says_where_leakage_and_amplification_come_back(tmp_path):
    points = [_point("none", None, 0.70, 0.00, 1.0), _point("dp_sgd", 1.0, 0.50, 0.0, 0.1), _point("dp_sgd", 10.0, 0.56, 0.0, 0.4),
              _point("dp_sgd", math.inf, 0.66, 0.03, 0.9), {"defense": "dp_sgd", "target_epsilon": 3.0, "status": "failed", "reason": "boom"}]  # fmt: skip
    points[0]["status"] = "ok"
    results = _results(points)
    assert comeback_lines(results) == [
        "dp_sgd: the released model leaks (an MIA's AUC interval above 0.5) from epsilon 10 (secmi); "
        "S2L amplifies (an AUC change's interval above 0) from epsilon inf (end2end secmi)"
    ]
    table = format_sweep(results)
    assert "| dp_sgd | inf | inf | 0.900 [0.850, 0.950] |" in table and "| dp_sgd | 3 | failed: boom |" in table
    path = plot_sweep(results, "dp_sgd", tmp_path / "frontier.png")
    assert path.stat().st_size > 10_000


@pytest.mark.slow  # three smoke matrices (about a minute)
def test_a_smoke_sweep_writes_its_table_and_figure(tmp_path, monkeypatch):
    from s2l_guard.runner.sweep import run_sweep, write_sweep

    monkeypatch.chdir(tmp_path)
    config = load_config(SMOKE).replace(run={"store": str(tmp_path / "store"), "workers": 1})
    results = run_sweep(config, ("dp_sgd",), (2.0, math.inf))
    assert [(p["defense"], p["target_epsilon"], p["status"]) for p in results["points"]] == [
        ("none", None, "ok"), ("dp_sgd", 2.0, "ok"), ("dp_sgd", math.inf, "ok")]  # fmt: skip
    assert results["points"][1]["epsilon"] == pytest.approx(2.0, abs=0.02) and math.isinf(results["points"][2]["epsilon"])
    assert results["points"][2]["noise_multiplier"] == 0.0 and results["points"][1]["noise_multiplier"] > 0
    files = write_sweep(tmp_path / "sweep", results)
    assert [f.name for f in files] == ["sweep.json", "sweep.md", "sweep-dp_sgd.png"] and all(f.stat().st_size for f in files)

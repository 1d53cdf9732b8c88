import json
from pathlib import Path

import pytest

from s2l_guard.cli import main
from s2l_guard.config import load_config
from s2l_guard.runner.ablation import ABLATIONS, ablation_rows
from s2l_guard.runner.settings import shaker_settings

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


def test_rows_sweep_the_setting_and_repeat_gaussian_draws():
    config = load_config(SMOKE)
    assert shaker_settings(config, "lora").rank == 2
    lora = ablation_rows(ABLATIONS["lora-rank"], config)
    assert [(v, r.label) for v, r in lora] == [(1, "lora-rank1"), (2, "lora")]  # rank 2 is the S2L table's row
    assert lora[0][1].overrides == (("rank", 1),) and lora[0][1].data == "SP" and lora[1][1].overrides == ()
    gaussian = ablation_rows(ABLATIONS["gaussian"], config)
    assert len(gaussian) == 2 * 2 and {r.draw for _, r in gaussian} == {0, 1}
    assert gaussian[0][1].label == "gaussian-0.0002-draw0"  # as in the S2L table, so its cells are shared


def test_ablate_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    config = tmp_path / "one.toml"
    config.write_text(f'extends = "{SMOKE}"\n[attack]\ndomains = ["digit7"]\nmia = ["loss"]\n')
    monkeypatch.chdir(tmp_path)
    assert main(["ablate", "lora-rank", "gaussian", "--config", str(config)]) == 0
    [run] = (tmp_path / "runs").iterdir()
    lora = json.loads((run / "ablation-lora-rank.json").read_text())
    points = lora["points"]
    assert [p["value"] for p in points] == [1, 2] and all(p["status"] == "ok" for p in points)
    assert points[0]["trainable_parameters"] < points[1]["trainable_parameters"]  # rank sets the parameter count
    gaussian = json.loads((run / "ablation-gaussian.json").read_text())
    assert all(p["draws"] == 2 for p in gaussian["points"])
    for name, column in (("lora-rank", "| rank |"), ("gaussian", "| sigma |")):
        assert (run / f"ablation-{name}.png").stat().st_size > 5000
        assert column in (run / f"ablation-{name}.md").read_text()


def test_unknown_ablation_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["ablate", "lora-alpha", "--config", str(SMOKE)])
    assert "invalid choice" in capsys.readouterr().err


def test_a_value_that_cannot_run_is_reported_with_its_reason(tmp_path, monkeypatch, capsys):
    """Eight learned vectors do not fit the testbed's 8-token prompts: the point says why."""
    config = tmp_path / "long.toml"
    config.write_text(f'extends = "{SMOKE}"\n[attack]\ndomains = ["digit7"]\nmia = ["loss"]\n[ablation]\nti_tokens = [1, 8]\n')
    monkeypatch.chdir(tmp_path)
    assert main(["ablate", "ti-tokens", "--config", str(config)]) == 0
    [run] = (tmp_path / "runs").iterdir()
    ok, failed = json.loads((run / "ablation-ti-tokens.json").read_text())["points"]
    assert ok["status"] == "ok" and failed["status"] == "failed"
    assert "exceeds the tokenizer's 8 tokens" in failed["reasons"][0]
    assert "exceeds the tokenizer's 8 tokens" in (run / "ablation-ti-tokens.md").read_text()

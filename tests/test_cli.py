import json
import subprocess
import sys
from pathlib import Path

import pytest

from s2l_guard.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")


@pytest.mark.slow  # a subprocess importing the whole toolkit
def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "s2l_guard.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("config", "testbed", "pretrain"):
        assert command in result.stdout


@pytest.mark.parametrize("argv", [["config", "show"], ["testbed", "build"], ["pretrain"], ["testbed"], ["config"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv + ["--help"])
    assert exit_.value.code == 0 and "usage: s2l-guard" in capsys.readouterr().out


def test_config_show_prints_the_resolved_profile(capsys):
    assert main(["config", "show", "--config", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "resolved from" in out and "steps = 12" in out and "learning_rate = 0.001" in out


def test_bad_config_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain]\nstepz = 3\n")
    assert main(["pretrain", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stepz" in err and "did you mean 'steps'" in err


def test_testbed_build_copies_to_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["testbed", "build", "--config", SMOKE, "--out", "digits"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "digits" / "metadata.jsonl").read_text().splitlines()]
    assert {r["membership"] for r in rows} == {"member", "nonmember", "public"}
    assert "digit7" in capsys.readouterr().out
    assert main(["testbed", "build", "--config", SMOKE, "--out", "digits"]) == 2  # refuses to overwrite


def test_pretrain_smoke_writes_a_run_and_reuses_artifacts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", SMOKE]) == 0
    first = capsys.readouterr().out
    [run] = (tmp_path / "runs").iterdir()
    results = json.loads((run / "pretrain.json").read_text())
    assert results["config"]["pretrain"]["steps"] == 12
    assert set(results["memorization"]["domains"]) == {"digit7", "digit8"}
    assert (run / "samples.png").stat().st_size > 1000 and "[pretrain]" in (run / "memorization.txt").read_text()
    assert "pre-trained bundle saved" in first and f"outputs in {Path('runs') / run.name}" in first
    assert main(["pretrain", "--config", SMOKE]) == 0
    second = capsys.readouterr().out
    assert "pre-trained bundle reused" in second and "memorization report reused" in second


def test_absent_device_is_a_config_error(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", SMOKE, "--device", "cuda"]) == 2
    assert "device = 'cuda' but torch sees no such device" in capsys.readouterr().err

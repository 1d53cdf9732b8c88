"""The Ray executor ([run] executor = "ray") on a local Ray instance: the same results.json as the
local executor, cell for cell, and a Ray worker killed mid-cell is retried to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from kill_anywhere import without_timings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The smoke matrix cut to one S2L method and no Gaussian rows: every kind of cell, few of them.
SMALL = f'extends = "{ROOT / "configs" / "smoke.toml"}"\n[matrix]\nshakers = ["lora"]\nmember_shakers = ["end2end"]\ngaussian_sigmas = []\n'


def matrix(folder: Path, *extra: str) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "small.toml").write_text(SMALL)
    env = dict(os.environ, OMP_NUM_THREADS="2")  # both executors then run one thread a cell, on both cores
    argv = [sys.executable, "-m", "s2l_guard.cli", "matrix", "--config", "small.toml", "--defense", "none", "--out", "m", *extra]
    return subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cells(folder: Path) -> dict:
    results = json.loads((folder / "m" / "results.json").read_text())
    return {c["id"]: without_timings(c) for c in results["cells"]}


def computing() -> list[int]:
    """The Ray worker processes computing a cell now."""
    return [int(pid) for pid in subprocess.run(["pgrep", "-f", "^ray::_ray_cell"], capture_output=True, text=True).stdout.split()]


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("local")
    proc = matrix(folder)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
    return cells(folder)


@pytest.mark.slow  # two small smoke matrices (about 2 minutes)
def test_ray_tasks_compute_the_cells_the_local_workers_do(local, tmp_path):
    proc = matrix(tmp_path, "--executor", "ray")
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "as Ray tasks on a local Ray instance" in out
    assert cells(tmp_path) == local


@pytest.mark.slow  # a small smoke matrix whose Ray worker is killed mid-cell (about a minute)
def test_a_ray_worker_killed_mid_cell_is_retried_to_the_same_results(local, tmp_path):
    proc = matrix(tmp_path, "--executor", "ray")
    killed, deadline = None, time.time() + 600
    while killed is None and time.time() < deadline and proc.poll() is None:
        busy = computing()
        if busy:  # a worker computing a cell (Ray names the process after the task it runs)
            time.sleep(1.0)  # well inside the cell
            if busy[0] in computing():
                killed = busy[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    out = proc.communicate(timeout=900)[0]
    assert killed is not None, f"no Ray worker was seen computing a cell:\n{out[-3000:]}"
    assert proc.returncode == 0, out[-3000:]
    assert cells(tmp_path) == local

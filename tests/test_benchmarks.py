"""The benchmark scripts: their bookkeeping, and that they run on the smoke profile."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import profile_cell  # noqa: E402


class Clock:
    """A perf_counter that advances only when told to, so stage times are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_stage_times_are_exclusive_and_nested_calls_count_to_their_stage(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(profile_cell.time, "perf_counter", clock)

    class Parts:
        def generate(self, seconds):
            clock.now += seconds

        def score(self, seconds):
            clock.now += seconds

        def finetune(self, train, scoring):
            clock.now += train
            self.score(scoring)  # the trajectory

        def sp_set(self, seconds):
            self.generate(seconds)  # generation inside SP generation is SP generation

    timer = profile_cell.StageTimer()
    timer.wrap(Parts, "generate", "candidate generation")
    timer.wrap(Parts, "score", "MIA secmi")
    timer.wrap(Parts, "finetune", "fine-tuning")
    timer.wrap(Parts, "sp_set", "SP generation")
    parts = Parts()
    with timer.stage("rest"):
        clock.now += 1.0
        parts.sp_set(5.0)
        parts.finetune(3.0, 2.0)
        parts.score(4.0)
        parts.generate(7.0)
    assert dict(timer.seconds) == {"rest": 1.0, "SP generation": 5.0, "fine-tuning": 3.0, "trajectory scoring": 2.0,
                                   "MIA secmi": 4.0, "candidate generation": 7.0}  # fmt: skip


@pytest.mark.slow
def test_profile_cell_runs_on_the_smoke_profile():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_cell.py"), "--config", "smoke", "--pretrain-steps", "2",
                          "--rows", "pretrained", "lora", "--threads", "1"], capture_output=True, text=True, cwd=ROOT, check=True).stdout  # fmt: skip
    lines = {line[:48].strip(): line[48:].split() for line in out.splitlines() if line[:48].strip()}
    stages = {
        k: float(v[0]) for k, v in lines.items() if k.startswith(("MIA", "candidate", "SP", "fine", "trajectory", "statistics", "rest", "extraction"))
    }
    assert {"SP generation", "fine-tuning", "trajectory scoring", "candidate generation", "MIA secmi"} <= set(stages)
    assert sum(stages.values()) == pytest.approx(float(lines["cells in all"][0]), abs=0.1 * len(stages))


@pytest.mark.slow
def test_ratios_print_one_line_per_measure_with_its_goal():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ratios.py"), "--config", "smoke", "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout  # fmt: skip
    measures = [line for line in out.splitlines() if line.rstrip().endswith(("met", "NOT met"))]
    names = [line.split()[0] + " " + line.split()[1] for line in measures]
    assert names[0] == "training step" and names[-2:] == ["sampling 8", "extraction matching,"]
    assert sum(name.startswith("MIA") for name in names) >= 5  # every registered MIA
    for line in measures:
        tokens = line.split()
        comparison = next(i for i, t in enumerate(tokens) if t in (">=", "<="))
        seconds, ratio = float(tokens[comparison - 2]), float(tokens[comparison - 1])
        assert seconds > 0 and 0 < ratio < 100


@pytest.mark.slow
def test_compile_gain_prints_eager_and_compiled_per_workload():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_gain.py"), "--config", "smoke", "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout  # fmt: skip
    lines = {line.split(",")[0]: line.split(",")[1].split() for line in out.splitlines() if line.startswith(("training step", "sampler forward"))}
    assert set(lines) == {"training step", "sampler forward"}
    for tokens in lines.values():  # batch N, compile s, eager s, compiled s, gain, break-even, max |diff|
        compile_seconds, eager, compiled = float(tokens[2]), float(tokens[3]), float(tokens[4])
        assert compile_seconds > 0 and eager > 0 and compiled > 0 and float(tokens[5].rstrip("x")) > 0
        assert float(tokens[7]) < 1e-3  # compiled kernels round differently, but compute the same function


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_dp_step_prints_the_plain_step_and_each_modes_ratio():
    from s2l_guard.privacy_settings import GRAD_SAMPLE_MODES

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dp_step.py"), "--config", "smoke", "--steps", "3", "--threads", "1"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout  # fmt: skip
    plain = float(next(line for line in out.splitlines() if line.startswith("plain step")).split()[2])
    for mode in GRAD_SAMPLE_MODES:
        line = next(line for line in out.splitlines() if line.startswith(f"DP step, {mode}"))
        seconds, ratio = float(line.split()[3]), float(line.split("DP / plain")[1].split()[0])
        assert ratio == pytest.approx(seconds / plain, rel=0.02)  # both printed rounded


def test_the_gpu_script_runs_the_latent_cell_in_bf16_at_smoke_size_on_cpu():
    """benchmarks/gpu.sh's script, as it would run on a GPU but at smoke size: the latent cell's
    stages are timed, and autocast really computes in bfloat16."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--size", "smoke", "--device", "cpu", "--stages", "latent"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout  # fmt: skip
    assert "autocast bfloat16 (a matmul's result inside it: torch.bfloat16)" in out
    stages = {line[:56].strip(): float(line[56:]) for line in out.splitlines() if line.startswith("latent: ")}
    assert {"latent: SP generation", "latent: fine-tuning", "latent: MIA secmi", "latent: candidate generation"} <= set(stages)
    assert all(seconds >= 0 for seconds in stages.values())
    assert "peak memory after the latent cell:" in out


@pytest.mark.slow
def test_the_gpu_script_runs_the_smoke_table_too():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--size", "smoke", "--device", "cpu", "--stages", "table"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout  # fmt: skip
    assert re.search(r"^table: \d+ cells and utility +\d+\.\d$", out, re.M) and "peak memory after the table" in out

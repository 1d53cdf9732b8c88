import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from s2l_guard.cache import MANIFEST, Store, content_key

ROOT = Path(__file__).resolve().parents[1]


def test_keys_depend_on_every_input():
    spec = {"a": 1, "b": [1, 2]}
    assert content_key("x", spec) == content_key("x", {"b": [1, 2], "a": 1})  # key order does not matter
    assert content_key("x", spec) != content_key("y", spec)
    assert content_key("x", spec) != content_key("x", {"a": 2, "b": [1, 2]})


def test_second_request_reuses_the_artifact(tmp_path):
    store, calls = Store(tmp_path), []

    def build(folder, key):
        calls.append(key)
        (folder / "data.txt").write_text("hello")

    first = store.get_or_build("thing", {"n": 1}, build)
    second = store.get_or_build("thing", {"n": 1}, build)
    assert len(calls) == 1 and not first.reused and second.reused and first.path == second.path
    assert (second.path / "data.txt").read_text() == "hello" and (second.path / MANIFEST).is_file()


def test_failed_build_leaves_nothing_behind(tmp_path):
    store = Store(tmp_path)

    def build(folder, key):
        (folder / "half.txt").write_text("half")
        raise RuntimeError("crash mid-build")

    with pytest.raises(RuntimeError):
        store.get_or_build("thing", {"n": 1}, build)
    assert store.find("thing", {"n": 1}) is None
    assert not list((tmp_path / "tmp").iterdir()) and not (tmp_path / "thing").exists()


def test_builds_abandoned_by_dead_processes_are_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / "tmp" / f"thing-abc-{dead.pid}-deadbeef"
    leftover.mkdir(parents=True)
    Store(tmp_path)
    assert not leftover.exists()


def pretrain(store: Path, out: Path, config: Path, **popen):
    code = f"import sys; from s2l_guard.cli import main; sys.exit(main(['pretrain', '--config', {str(config)!r}]))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


BUILD_TWICE = """
import os, sys, time
from pathlib import Path
from s2l_guard.cache import Store

arrivals = Path(sys.argv[2]).parent

def build(folder, key):
    with open(sys.argv[2], "a") as log:
        log.write("built\\n")
    deadline = time.time() + 60  # hold the build until the other process has come for it too
    while len(list(arrivals.glob("arrived-*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # it asks the store right after arriving
    (folder / "x.txt").write_text("content")

(arrivals / f"arrived-{os.getpid()}").touch()
art = Store(sys.argv[1]).get_or_build("demo", {"a": 1}, build)
print(art.path, art.reused)
"""


def test_two_processes_needing_one_artifact_build_it_once(tmp_path):
    """Two runs on one store: the second waits for the first's build and reuses it."""
    script = tmp_path / "build.py"
    script.write_text(BUILD_TWICE)
    builds = tmp_path / "builds.log"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), str(builds)], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].split("\n") for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert builds.read_text() == "built\n"
    results = sorted(line for out in outs for line in out if line and not line.startswith("[s2l-guard]"))
    assert len(results) == 2 and results[0].split()[0] == results[1].split()[0]
    assert sorted(r.split()[1] for r in results) == ["False", "True"]
    assert any("waiting for another process that is building demo" in line for out in outs for line in out)


@pytest.mark.slow  # SIGKILLs a pre-training subprocess (about 40 s)
def test_killed_pretrain_resumes_to_the_same_result(tmp_path):
    """SIGKILL a pre-training after its first checkpoint; the rerun resumes and matches a clean run.

    It runs Stable Diffusion's recipe (constant rate after a warm-up, EMA weights released), so the
    released weights match only if the moving average resumes from the checkpoint too."""
    config = tmp_path / "kill.toml"
    config.write_text(
        f'extends = "{ROOT / "configs" / "smoke.toml"}"\n[pretrain]\nsteps = 40\ncheckpoint_every = 5\n'
        'lr_schedule = "constant_with_warmup"\nwarmup_steps = 4\nema_decay = 0.9\nrelease = "ema"\n'
        "[report]\nsamples_per_domain = 2\nsampler_steps = 2\n"
    )
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    killed_dir.mkdir()
    clean_dir.mkdir()
    proc = pretrain(tmp_path, killed_dir, config)
    checkpoints = killed_dir / ".s2l-cache" / "work"
    deadline = time.time() + 120
    while not list(checkpoints.glob("bundle-*/checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before it could be killed:\n{proc.stdout.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((killed_dir / ".s2l-cache").glob("bundle/*")), "a killed run left a bundle behind"

    rerun = pretrain(tmp_path, killed_dir, config)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert "resumed from the checkpoint at step" in out
    clean = pretrain(tmp_path, clean_dir, config)
    clean_out, _ = clean.communicate(timeout=300)
    assert clean.returncode == 0, clean_out

    def weights(folder):
        [bundle] = (folder / ".s2l-cache" / "bundle").iterdir()
        return load_file(next((bundle / "unet").glob("*.safetensors")))

    a, b = weights(killed_dir), weights(clean_dir)
    [bundle] = (killed_dir / ".s2l-cache" / "bundle").iterdir()
    summary = json.loads((bundle / "training.json").read_text())
    assert summary["release"] == "ema" and summary["ema_final_decay"] == pytest.approx(40 / 49)  # SD's warm-up at step 40
    assert summary["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # what the weights' rounding depends on
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(checkpoints.iterdir()), "the finished build should drop its checkpoint"

    again = pretrain(tmp_path, killed_dir, config)
    out, _ = again.communicate(timeout=300)
    assert "pre-trained bundle reused" in out and "memorization report reused" in out


@pytest.mark.slow  # two small smoke tables at once, in subprocesses
def test_two_runs_of_one_table_on_one_store_agree(tmp_path):
    """Started together on one store, each build happens once (the other run waits for it): both
    finish with the same results and every artifact's manifest matches its key."""
    config = tmp_path / "twice.toml"
    config.write_text(
        f'extends = "{Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"}"\n[run]\nstore = "{tmp_path / "store"}"\nworkers = 1\n'
        "[attack]\ndomains = ['digit7']\nshakers = ['lora']\nood_shakers = []\nood_generated_shakers = []\ngaussian_sigmas = []\nmia = ['loss']\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = f"import sys; from s2l_guard.cli import main; sys.exit(main(['attack', '--config', {str(config)!r}]))"
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=f, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for f in folders
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert any("waiting for another process" in out for out in outs)  # they did meet
    results = []
    for folder in folders:
        [path] = (folder / "runs").rglob("results.json")
        results.append(json.loads(path.read_text())["table"])  # the pooled rows: statistics only, no timings
    assert results[0] == results[1]
    for manifest in (tmp_path / "store").glob(f"*/*/{MANIFEST}"):
        entry = json.loads(manifest.read_text())
        assert content_key(entry["kind"], entry["spec"]) == manifest.parent.name

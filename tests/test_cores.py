"""The machine-wide core lease: a core is leased once, freed when its holder dies, and a
command that finds the cores taken waits for them instead of competing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from s2l_guard.cores import core_lease, release, try_take

HOLD = """
import sys, time
from pathlib import Path
from s2l_guard.cores import try_take
held = try_take(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
print("held" if held else "none", flush=True)
time.sleep(600)
"""


def hold(count: int, cores: int, folder: Path) -> subprocess.Popen:
    """A process holding ``count`` of ``cores`` cores until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(count), str(cores), str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_core_is_leased_once_and_freed_when_its_holder_is_killed(tmp_path):
    holder = hold(1, 2, tmp_path)
    try:
        assert try_take(2, 2, tmp_path) is None  # one of the two is taken
        one = try_take(1, 2, tmp_path)
        assert one is not None and len(one) == 1
        assert try_take(1, 2, tmp_path) is None  # both are taken now
        release(one)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    both = try_take(2, 2, tmp_path)  # the kernel dropped the dead holder's lock
    assert both is not None and len(both) == 2
    release(both)


def test_the_lease_waits_until_the_cores_are_free(tmp_path, monkeypatch):
    monkeypatch.setenv("S2L_GUARD_CORE_LEASE", "1")
    holder = hold(2, 2, tmp_path)
    start = time.monotonic()
    try:
        threading.Timer(1.0, holder.kill).start()
        with core_lease(2, cores=2, folder=tmp_path, poll=0.05):
            waited = time.monotonic() - start
            assert try_take(1, 2, tmp_path) is None  # this block holds both
    finally:
        holder.kill()
        holder.wait()
    assert waited >= 0.9
    assert try_take(2, 2, tmp_path) is not None  # and gave them back


def test_the_lease_asks_no_more_cores_than_there_are_and_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("S2L_GUARD_CORE_LEASE", "1")
    with core_lease(8, cores=2, folder=tmp_path):
        assert try_take(1, 2, tmp_path) is None
    monkeypatch.setenv("S2L_GUARD_CORE_LEASE", "0")
    with core_lease(2, cores=2, folder=tmp_path):
        assert try_take(2, 2, tmp_path) is not None


def test_a_command_waits_for_the_cores_another_command_holds(tmp_path):
    """A computing command started while every core is leased says it waits, and goes on once they are freed."""
    cores = os.cpu_count() or 1
    holder = hold(cores, cores, tmp_path / "lease")
    env = dict(os.environ, S2L_GUARD_CORE_LEASE="1", S2L_GUARD_CORE_LEASE_DIR=str(tmp_path / "lease"), OMP_NUM_THREADS="1")
    command = subprocess.Popen([sys.executable, "-m", "s2l_guard.cli", "pretrain", "--config", "smoke"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        lines = iter(command.stdout.readline, "")
        assert any("waiting for 1 of the" in line for line in lines)
        time.sleep(1.0)
        assert command.poll() is None and not (tmp_path / ".s2l-cache").exists()  # nothing built while it waits
        holder.kill()
        assert any("got the cores after" in line for line in lines)
    finally:
        holder.kill()
        holder.wait()
        command.send_signal(signal.SIGINT)
        command.communicate(timeout=60)


ORPHANED = """
import subprocess, sys, time
watcher = "from s2l_guard.runner.cells import exit_with_parent; import time; exit_with_parent(0.05); print('watching', flush=True); time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", watcher], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "watching"
print(child.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    """The process exited (it may linger as a zombie until its new parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_cell_worker_exits_when_its_parent_is_killed_outright(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", ORPHANED], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    try:
        assert not _gone(worker)
        parent.send_signal(signal.SIGKILL)  # no shutdown reaches the worker
        parent.wait()
        deadline = time.monotonic() + 10
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(worker), "the orphaned worker kept running"
    finally:
        if not _gone(worker):
            os.kill(worker, signal.SIGKILL)

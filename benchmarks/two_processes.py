"""Two s2l-guard commands started together on one machine: how long each takes against one alone.

Each command runs in its own fresh folder (its own store), so the two together do twice the work
of the one alone. With the core lease (s2l_guard/cores.py) the second waits for the first's cores;
without it (``--no-lease``) their OpenMP threads compete. Goal: each within 2.5x of one alone.

    .venv/bin/python benchmarks/two_processes.py                       # attack --config smoke
    .venv/bin/python benchmarks/two_processes.py --no-lease            # the same, threads competing
    .venv/bin/python benchmarks/two_processes.py --args pretrain --config quick
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start(workdir: Path, argv: list[str], lease: bool, lease_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, S2L_GUARD_CORE_LEASE="1" if lease else "0", S2L_GUARD_CORE_LEASE_DIR=str(lease_dir))
    env.pop("OMP_NUM_THREADS", None)  # each command sizes its threads as a user's would
    workdir.mkdir(parents=True)
    log = (workdir / "run.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "s2l_guard.cli", *argv], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)


def timed(procs: list[subprocess.Popen], workdirs: list[Path]) -> list[float]:
    """Each process's wall time from now until it exits (all must exit 0)."""
    begin, ends = time.perf_counter(), {}
    while len(ends) < len(procs):
        for i, proc in enumerate(procs):
            if i not in ends and proc.poll() is not None:
                ends[i] = time.perf_counter() - begin
                if proc.returncode != 0:
                    raise SystemExit(f"command exited {proc.returncode}; see {workdirs[i] / 'run.log'}")
        time.sleep(0.2)
    return [ends[i] for i in range(len(procs))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--args", nargs=argparse.REMAINDER, default=["attack", "--config", "smoke"], help="the s2l-guard command (default: attack --config smoke)"
    )
    parser.add_argument("--no-lease", action="store_true", help="run both without the core lease")
    options = parser.parse_args()
    lease = not options.no_lease
    with tempfile.TemporaryDirectory(prefix="s2l-two-") as tmp:
        root = Path(tmp)
        alone_dir = root / "alone"
        (alone,) = timed([start(alone_dir, options.args, lease, root / "lease")], [alone_dir])
        dirs = [root / "first", root / "second"]
        together = timed([start(d, options.args, lease, root / "lease") for d in dirs], dirs)
        waited = ["waiting for" in (d / "run.log").read_text() for d in dirs]
    print(f"command: s2l-guard {' '.join(options.args)}; {os.cpu_count()} cores; core lease {'on' if lease else 'off'}")
    print(f"one alone: {alone:.1f} s")
    for name, seconds, wait in zip(("first", "second"), together, waited):
        print(f"two together, {name}: {seconds:.1f} s = {seconds / alone:.2f}x alone{' (waited for the cores)' if wait else ''}")
    print(f"slower of the two: {max(together) / alone:.2f}x one alone (goal <= 2.5)")


if __name__ == "__main__":
    main()

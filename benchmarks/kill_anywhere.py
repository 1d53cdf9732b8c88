"""SIGKILL a matrix run at random moments and check that every rerun resumes it faithfully.

One uninterrupted run is the reference. A second run, on its own store, is killed (its whole
process group: workers too) at a random moment, rerun, killed again, ... until ``--kills`` runs
have been killed, then run to the end. A run that finishes before its moment ends a chain: its
results.json is checked, the store is emptied and a new chain starts. After every run the store
is checked: each artifact's manifest must hash to its folder's key and its files must read back
(no torn artifact), and every artifact finished before the run must still be the same build
after it (nothing finished is recomputed). Every chain's final results.json must equal the
reference's but for timings.

    .venv/bin/python benchmarks/kill_anywhere.py            # 20 kills of the smoke matrix (a few minutes)
    .venv/bin/python benchmarks/kill_anywhere.py --kills 5 --args attack --config smoke

Runs use one thread (OMP_NUM_THREADS=1) so the reference and the resumed run round alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s2l_guard.cache import MANIFEST, content_key  # noqa: E402

# Left out of the comparison: timings, and the commit that computed a run (a commit made while the
# benchmark runs changes it; a change that moved a result would still show in the values).
TIMING_KEYS = ("seconds", "cached", "wall_seconds", "wall_seconds_this_process", "created", "code_version")


def run(workdir: Path, argv: list[str], kill_after: float | None) -> tuple[bool, float]:
    """Run the CLI in ``workdir``; with ``kill_after``, SIGKILL its process group then. Returns
    (finished, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "s2l_guard.cli", *argv], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        proc.wait(timeout=kill_after)
        if proc.returncode != 0:
            raise SystemExit(f"the run exited {proc.returncode} in {workdir}: {' '.join(argv)}")
        return True, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False, time.perf_counter() - start


def finished_artifacts(store: Path) -> tuple[dict[str, float], list[str]]:
    """Every finished artifact of the store (kind/key -> its manifest's build time), and the corrupt ones."""
    finished, corrupt = {}, []
    for manifest in store.glob(f"*/*/{MANIFEST}"):
        folder = manifest.parent
        name = f"{folder.parent.name}/{folder.name}"
        try:
            entry = json.loads(manifest.read_text())
            ok = content_key(entry["kind"], entry["spec"]) == folder.name
            for part in folder.glob("*.json"):
                json.loads(part.read_text())
        except (OSError, ValueError, KeyError):
            ok = False
        if ok:
            finished[name] = entry["created"]
        else:
            corrupt.append(name)
    return finished, corrupt


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def differences(a, b, path: str = "") -> list[str]:
    """The paths at which two JSON values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys(), key=str) for d in differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {str(a)[:80]} != {str(b)[:80]}"]


def same_results(resumed: Path, reference: Path) -> bool:
    """Whether the resumed run's results.json files equal the reference's; prints where they do not."""
    diff = differences(results_of(resumed), results_of(reference))
    for line in diff[:10]:
        print(f"  differs: {line}")
    return not diff


def results_of(workdir: Path) -> dict:
    """Every results.json the run wrote (the matrix's, the tables'), by path, without timings."""
    runs = workdir / "runs"
    return {str(p.relative_to(runs)): without_timings(json.loads(p.read_text())) for p in sorted(runs.rglob("results.json"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--args", nargs=argparse.REMAINDER, default=["matrix", "--config", "smoke", "--defense", "none", "dedup"],
                        help="the s2l-guard command to run (default: the smoke matrix, undefended and dedup)")  # fmt: skip
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        reference, resumed = Path(tmp) / "reference", Path(tmp) / "resumed"
        reference.mkdir()
        resumed.mkdir()
        _, total = run(reference, args.args, None)
        _, overhead = run(reference, args.args, None)  # everything stored: imports, loading, statistics
        print(f"reference: {' '.join(args.args)} in {total:.1f} s uninterrupted; {overhead:.1f} s a rerun with everything stored")
        kills = runs = corrupt_total = recomputed_total = 0
        finished_runs: list[bool] = []  # each run that finished: its results.json equal to the reference's?
        before: dict[str, float] = {}
        while kills < args.kills and runs < 4 * args.kills:
            runs += 1
            moment = rng.uniform(0.5, overhead + 2 * max(total - overhead, 0) / args.kills)  # a rerun starts afresh: imports again
            done, took = run(resumed, args.args, moment)
            finished, corrupt = finished_artifacts(resumed / ".s2l-cache")
            recomputed = [name for name, created in before.items() if finished.get(name) != created]
            corrupt_total += len(corrupt)
            recomputed_total += len(recomputed)
            kills += not done
            print(f"run {runs}, kill moment {moment:.1f} s: {'finished first' if done else f'killed ({kills}/{args.kills})'}; "
                  f"{len(finished)} artifacts finished, {len(corrupt)} corrupt, {len(recomputed)} recomputed")  # fmt: skip
            before = finished
            if done:  # the chain reached the end: check it, then start a new one on an empty store
                finished_runs.append(same_results(resumed, reference))
                shutil.rmtree(resumed)
                resumed.mkdir()
                before = {}
        run(resumed, args.args, None)
        finished, corrupt = finished_artifacts(resumed / ".s2l-cache")
        recomputed_total += sum(1 for name, created in before.items() if finished.get(name) != created)
        corrupt_total += len(corrupt)
        finished_runs.append(same_results(resumed, reference))
        identical = all(finished_runs)
    print(f"{kills}/{args.kills} kills resumed ({runs} killed or finished runs, {len(finished_runs)} chains run to the end: "
          f"{'every' if identical else 'NOT every'} final results.json identical), {corrupt_total} corrupt, {recomputed_total} recomputed")  # fmt: skip
    return 0 if identical and kills == args.kills and not corrupt_total and not recomputed_total else 1


if __name__ == "__main__":
    sys.exit(main())

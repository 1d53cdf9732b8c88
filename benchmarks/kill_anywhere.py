"""SIGKILL a matrix run at random moments and check that every rerun resumes it faithfully.

One uninterrupted run is the reference. A second run, on its own store, is killed (its whole
process group: workers too) at a random moment, rerun, killed again, ... ``--kills`` times, then
run to the end; the moments are random points of the reference's work, so every one of the
kills lands before the run is done (see ``kill_moments``). After every kill the store is checked: each artifact's manifest must hash to
its folder's key and its files must read back (no torn artifact), and every artifact that was
finished before a rerun must still be the same build after it (nothing finished is recomputed).
At the end the two results.json files must be equal but for timings.

    .venv/bin/python benchmarks/kill_anywhere.py            # 20 kills of the smoke matrix (a few minutes)
    .venv/bin/python benchmarks/kill_anywhere.py --kills 5 --args attack --config smoke

Runs use one thread (OMP_NUM_THREADS=1) so the reference and the resumed run round alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s2l_guard.cache import MANIFEST, content_key  # noqa: E402

TIMING_KEYS = ("seconds", "cached", "wall_seconds", "wall_seconds_this_process", "created")


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


def kill_moments(rng: random.Random, kills: int, work: float) -> list[float]:
    """Seconds of work each run does before its kill: the gaps between ``kills`` sorted random
    points of the first 95% of the reference's work. A killed run loses what it had not stored, so
    its successor is at most where the reference was at that point: every run is killed before the
    end, and the last kill lands at most 95% of the way through."""
    points = sorted(rng.uniform(0, 0.95 * work) for _ in range(kills))
    return [later - earlier for earlier, later in zip([0.0, *points], points)]


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


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
        kills = corrupt_total = recomputed_total = 0
        before: dict[str, float] = {}
        for k, work in enumerate(kill_moments(rng, args.kills, total - overhead)):
            moment = overhead + work  # each rerun starts afresh (imports, loading), then works on from where the last was killed
            done, took = run(resumed, args.args, moment)
            finished, corrupt = finished_artifacts(resumed / ".s2l-cache")
            recomputed = [name for name, created in before.items() if finished.get(name) != created]
            corrupt_total += len(corrupt)
            recomputed_total += len(recomputed)
            print(f"kill {k + 1}/{args.kills} at {moment:.1f} s: {'finished first' if done else 'killed'}; "
                  f"{len(finished)} artifacts finished, {len(corrupt)} corrupt, {len(recomputed)} recomputed")  # fmt: skip
            kills += not done
            before = finished
        run(resumed, args.args, None)
        finished, corrupt = finished_artifacts(resumed / ".s2l-cache")
        recomputed_total += sum(1 for name, created in before.items() if finished.get(name) != created)
        corrupt_total += len(corrupt)
        identical = results_of(resumed) == results_of(reference)
    print(f"{kills}/{args.kills} kills resumed (each by the next run; {args.kills - kills} finished before their moment); "
          f"final results.json {'identical' if identical else 'DIFFERENT'}, {corrupt_total} corrupt, {recomputed_total} recomputed")  # fmt: skip
    return 0 if identical and not corrupt_total and not recomputed_total else 1


if __name__ == "__main__":
    sys.exit(main())

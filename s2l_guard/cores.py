"""A machine-wide lease on the CPU cores, shared by the s2l-guard commands of one user.

Two torch processes whose OpenMP threads together outnumber the cores spin against each other
and run 5-18x slower than one alone (docs/performance.md). So a computing command first leases
as many cores as it will run threads; a second command that finds them taken waits, and says so,
instead of competing: two commands started together finish in about the time of the two in turn.
The lease is a set of flock'd files, one per core: the kernel drops a lock when its process dies,
so a killed run never leaves cores taken. Worker processes a command spawns share its lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

SWITCH = "S2L_GUARD_CORE_LEASE"  # "0" runs without a lease (the test tiers size their threads themselves)
FOLDER = "S2L_GUARD_CORE_LEASE_DIR"


def lease_folder() -> Path:
    default = Path(tempfile.gettempdir()) / f"s2l-guard-cores-{os.getuid()}"
    return Path(os.environ.get(FOLDER) or default)


def try_take(count: int, cores: int, folder: Path) -> list[IO] | None:
    """Locks on ``count`` of the ``cores`` core files, or None (and nothing held) if fewer are free."""
    folder.mkdir(parents=True, exist_ok=True)
    held: list[IO] = []
    for core in range(cores):
        handle = (folder / f"core-{core}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        held.append(handle)
        if len(held) == count:
            return held
    release(held)
    return None


def release(held: list[IO]) -> None:
    for handle in held:
        handle.close()  # closing the file drops its flock


@contextlib.contextmanager
def core_lease(threads: int, *, cores: int | None = None, folder: Path | None = None, poll: float = 0.5) -> Iterator[None]:
    """Hold ``threads`` cores (at most all of them) for the block, waiting while others hold them."""
    if os.environ.get(SWITCH, "1") == "0":
        yield
        return
    cores = cores or os.cpu_count() or 1
    count = max(1, min(threads, cores))
    folder = folder or lease_folder()
    started = time.monotonic()
    waiting = False
    while (held := try_take(count, cores, folder)) is None:
        if not waiting:
            from .runtime import log

            log(f"waiting for {count} of the {cores} CPU cores, which other s2l-guard commands are using "
                f"(two at once would run many times slower; {SWITCH}=0 runs anyway)")  # fmt: skip
            waiting = True
        time.sleep(poll * random.uniform(0.5, 1.5))  # jittered, so two waiters do not take turns failing
    if waiting:
        from .runtime import log

        log(f"got the cores after {time.monotonic() - started:.0f} s")
    try:
        yield
    finally:
        release(held)

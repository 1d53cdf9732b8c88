"""A content-addressed store of artifacts (data sets, bundles, reports).

An artifact's key is the hash of everything that determines it: its kind, the
config it was built from, the seed, the keys of its upstream artifacts and the
store's format version. An artifact is built in a private temporary folder and
renamed into place only when complete, so a killed run never leaves a
half-written artifact, and a rerun with the same inputs reuses it. Long builds
keep resumable state (checkpoints) in a work folder under the same key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CacheError

FORMAT_VERSION = 1  # bump when an artifact's on-disk format changes
MANIFEST = "s2l-artifact.json"


def content_key(kind: str, spec: Any) -> str:
    """Hash of a JSON-serialisable spec; equal specs give equal keys on every machine."""
    blob = json.dumps({"kind": kind, "format": FORMAT_VERSION, "spec": spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def folder_key(folder: Path) -> str:
    """Hash of every file under ``folder`` (relative path and bytes), ignoring the store's manifest."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class Artifact:
    kind: str
    key: str
    path: Path
    reused: bool


class Store:
    """Artifacts under ``root/<kind>/<key>/``; temporary builds under ``root/tmp``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the artifact store at {self.root} ({exc}); set [run] store to a writable folder") from None
        self._remove_abandoned_builds()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def workdir(self, kind: str, key: str) -> Path:
        """A folder for resumable state of the build of (kind, key); kept until the build succeeds."""
        folder = self.root / "work" / f"{kind}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def find(self, kind: str, spec: Any) -> Artifact | None:
        key = content_key(kind, spec)
        path = self.path(kind, key)
        return Artifact(kind, key, path, True) if (path / MANIFEST).is_file() else None

    def get_or_build(self, kind: str, spec: Any, build: Callable[[Path, str], None]) -> Artifact:
        """Return the artifact for ``spec``, building it with ``build(folder, key)`` if absent.

        One process builds a given artifact at a time: another that needs it meanwhile (two runs
        of one matrix on one store) waits for the build and then reuses it."""
        found = self.find(kind, spec)
        if found:
            return found
        key = content_key(kind, spec)
        with self._build_lock(kind, key):
            found = self.find(kind, spec)  # built by the process that held the lock
            return found or self._build(kind, key, spec, build)

    @contextlib.contextmanager
    def _build_lock(self, kind: str, key: str) -> Iterator[None]:
        """An exclusive lock on (kind, key) across processes; the OS drops it if the holder dies."""
        path = self.root / "locks" / f"{kind}-{key}.lock"
        path.parent.mkdir(exist_ok=True)
        with path.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                from .runtime import log  # imports torch; only a waiting process pays for it here

                log(f"waiting for another process that is building {kind} {key}")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _build(self, kind: str, key: str, spec: Any, build: Callable[[Path, str], None]) -> Artifact:
        final = self.path(kind, key)
        tmp = self.root / "tmp" / f"{kind}-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            build(tmp, key)
            manifest = {"kind": kind, "key": key, "format": FORMAT_VERSION, "spec": spec, "created": time.time()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # a leftover without manifest, or a concurrent twin finished first
                if (final / MANIFEST).is_file():
                    shutil.rmtree(tmp)
                    return Artifact(kind, key, final, True)
                shutil.rmtree(final)
            os.rename(tmp, final)  # atomic on one file system
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.root / "work" / f"{kind}-{key}", ignore_errors=True)
        return Artifact(kind, key, final, False)

    def _remove_abandoned_builds(self) -> None:
        """Delete temporary folders of builds whose process is gone (killed runs)."""
        for folder in (self.root / "tmp").iterdir():
            try:
                pid = int(folder.name.rsplit("-", 2)[-2])
            except (ValueError, IndexError):
                continue
            if pid != os.getpid() and not _alive(pid):
                shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so readers see either the old content or the new, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

"""Temporary folders: each writer holds an exclusive lock on ``FOLDER.lock`` (taken before the
folder exists) for as long as it lives, so a folder whose lock is free was left by a process that
died, and can be removed safely.

- Artifact writers write ``.NAME.tmp-XXXXXXXX`` beside the store ``NAME`` (:func:`temporaries`,
  :func:`reclaim_stale`).
- A prefill to disk without a store writes a scratch store ``rcengine-kv-XXXXXXXX`` in its scratch
  folder (:class:`Scratch`), removed with its document; one left by a killed process is removed by
  the next scratch prefill in that folder (:func:`reclaim_stale_scratch`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SCRATCH_PREFIX = "rcengine-kv-"


@dataclass(frozen=True, slots=True)
class Temporary:
    """A writer's temporary folder beside a store: its path, bytes on disk, and whether a live
    process still writes it."""

    path: Path
    bytes: int
    live: bool


def remove_tree(path: str | Path, patience_s: float = 2.0) -> None:
    """Remove a folder that a write still in flight may recreate a file in (zarr finishes an
    operation on its own event loop after the caller was interrupted): removed again until it
    stays gone, for at most ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def lock_path(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".lock")


def _held(tmp: Path) -> bool:
    """Whether a live writer holds ``tmp``'s lock (a writer takes it before creating the folder)."""
    try:
        fd = os.open(lock_path(tmp), os.O_RDWR)
    except FileNotFoundError:
        return False  # no lock: left by a writer that died (or an older rcengine)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we took
    return False


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def temporaries(location: str | Path) -> list[Temporary]:
    """Temporary folders of writers of the store at ``location`` (a local path), live or stale."""
    final = Path(location)
    parent = final.parent
    if not parent.is_dir():
        return []
    return _described(p for p in parent.glob(f".{final.name}.tmp-*") if p.is_dir())


def reclaim_stale(location: str | Path) -> list[Temporary]:
    """Remove the temporary folders of writers of ``location`` that died (their lock is free);
    -> what was removed.  Folders a live writer holds are left alone."""
    return _remove_stale(temporaries(location))


def _described(folders: Iterable[Path]) -> list[Temporary]:
    return [Temporary(p, _size(p), _held(p)) for p in sorted(folders)]


def _remove_stale(found: list[Temporary]) -> list[Temporary]:
    removed = [t for t in found if not t.live]
    for t in removed:
        _remove_with_lock(t.path)
    return removed


def _remove_with_lock(folder: Path) -> None:
    remove_tree(folder)
    lock_path(folder).unlink(missing_ok=True)


def _scratch_parent(parent: str | Path | None) -> Path:
    return Path(parent) if parent is not None else Path(tempfile.gettempdir())


class Scratch:
    """A scratch folder ``PARENT/rcengine-kv-XXXXXXXX`` (PARENT made if missing; the system's
    temporary folder if None), locked while this object lives; :meth:`remove` removes both."""

    def __init__(self, parent: str | Path | None = None) -> None:
        parent = _scratch_parent(parent)
        parent.mkdir(parents=True, exist_ok=True)
        self._fd, lock = tempfile.mkstemp(prefix=SCRATCH_PREFIX, suffix=".lock", dir=parent)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # taken before the folder exists
        self.path = Path(lock[: -len(".lock")])
        try:
            self.path.mkdir()
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        if self._fd is None:
            return
        _remove_with_lock(self.path)
        os.close(self._fd)
        self._fd = None


def stale_scratch(parent: str | Path | None = None) -> list[Temporary]:
    """Scratch folders in ``parent`` (default: the system's temporary folder), live or left by a
    process that died.  Only folders with a lock file count: the lock is what tells them apart."""
    parent = _scratch_parent(parent)
    if not parent.is_dir():
        return []
    return _described(p for p in parent.glob(f"{SCRATCH_PREFIX}*") if p.is_dir() and lock_path(p).exists())


def reclaim_stale_scratch(parent: str | Path | None = None) -> list[Temporary]:
    """Remove the scratch folders in ``parent`` whose process died; -> what was removed."""
    return _remove_stale(stale_scratch(parent))

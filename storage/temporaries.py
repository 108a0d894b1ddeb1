"""Temporary folders of artifact writers: each writer holds an exclusive lock on
``.NAME.tmp-XXXXXXXX.lock`` (taken before the folder exists) for as long as it lives, so a folder
whose lock is free was left by a writer that died, and can be removed safely."""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Temporary:
    """A writer's temporary folder beside a store: its path, bytes on disk, and whether a live
    process still writes it."""

    path: Path
    bytes: int
    live: bool


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
    found = [p for p in parent.glob(f".{final.name}.tmp-*") if p.is_dir()]
    return [Temporary(p, _size(p), _held(p)) for p in sorted(found)]


def reclaim_stale(location: str | Path) -> list[Temporary]:
    """Remove the temporary folders of writers of ``location`` that died (their lock is free);
    -> what was removed.  Folders a live writer holds are left alone."""
    removed = []
    for tmp in temporaries(location):
        if tmp.live:
            continue
        shutil.rmtree(tmp.path, ignore_errors=True)
        lock_path(tmp.path).unlink(missing_ok=True)
        removed.append(tmp)
    return removed

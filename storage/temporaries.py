"""Temporary folders: each writer holds an exclusive lock on ``FOLDER.lock`` (taken before the
folder exists) for as long as it lives, so a folder whose lock is free was left by a process that
died, and can be removed safely.

- Artifact writers write ``.NAME.tmp-XXXXXXXX`` beside the store ``NAME`` (:func:`temporaries`,
  :func:`reclaim_stale`).  A writer replacing a store moves the old one aside to
  ``.NAME.old-XXXXXXXX`` while it holds the store's lock (``store_lock.py``), and removes it once the
  new one is in place; one left by a writer that died is put back (no store at ``NAME``: the
  replacement never happened) or removed (the new store is in place), by the next writer of that
  store, only if it holds nothing but an rcengine store.
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
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import zarr_loop
from .errors import StoreBusyError
from .store_lock import StoreLock, store_lock_path

SCRATCH_PREFIX = "rcengine-kv-"


@dataclass(frozen=True, slots=True)
class Temporary:
    """A writer's temporary folder beside a store (or an old store moved aside): its path, bytes
    on disk, and whether a live process still writes it; ``restored``: an old store put back."""

    path: Path
    bytes: int
    live: bool
    restored: bool = False


def remove_tree(path: str | Path, patience_s: float = 2.0) -> None:
    """Remove a folder that a write still in flight may recreate a file in: zarr finishes an
    operation on its own event loop after the caller was interrupted, so those end first
    (:func:`zarr_loop.settle`); then it is removed again until it stays gone, for at most
    ``patience_s``."""
    zarr_loop.settle()
    deadline = time.monotonic() + patience_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def lock_path(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".lock")


def _held(tmp: Path) -> bool:
    """Whether a live writer holds ``tmp``'s lock (a writer takes it before creating the folder;
    no lock file: left by a writer that died, or an older rcengine)."""
    return _held_path(lock_path(tmp))


def _size(path: Path) -> int:
    return sum(f.lstat().st_size for f in path.rglob("*") if not f.is_symlink() and f.is_file())


def temporaries(location: str | Path) -> list[Temporary]:
    """Temporary folders of writers of the store at ``location`` (a local path), live or stale,
    and old stores moved aside by a replacement (live while a writer holds the store's lock)."""
    final = Path(location).resolve()
    parent = final.parent
    if not parent.is_dir():
        return []
    tmps = _described(p for p in parent.glob(f".{final.name}.tmp-*") if _is_folder(p))
    olds = sorted(p for p in parent.glob(f".{final.name}.old-*") if _is_folder(p))
    busy = bool(olds) and _held_path(store_lock_path(final))
    return tmps + [Temporary(p, _size(p), busy) for p in olds]


def reclaim_stale(location: str | Path, locked: bool = False) -> list[Temporary]:
    """Remove the temporary folders of writers of ``location`` that died (their lock is free),
    and put back or remove old stores they moved aside (see the module docstring); -> what was
    done.  ``locked``: the caller holds the store's lock (else it is taken here, and old stores
    are left alone while another process holds it).  Folders a live writer holds are left alone."""
    final = Path(location).resolve()
    found = temporaries(final)
    done = _remove_stale([t for t in found if ".tmp-" in t.path.name])
    olds = [t.path for t in found if ".old-" in t.path.name]
    if not olds:
        return done
    if locked:
        return done + _settle_olds(final, olds)
    try:
        lock = StoreLock(final)
    except StoreBusyError:
        return done
    try:
        return done + _settle_olds(final, olds)
    finally:
        lock.release()


def _settle_olds(final: Path, olds: list[Path]) -> list[Temporary]:
    """Under the store's lock: the newest old store goes back where the store is missing; the
    others (and all, where a store is in place) are removed.  Only folders holding nothing but an
    rcengine store are touched."""
    from .ownership import is_own_store  # (ownership reads manifests: imported when there is work)

    out = []
    for old in sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True):
        if not is_own_store(old):
            continue
        size = _size(old)
        if not os.path.lexists(final):
            os.rename(old, final)
            out.append(Temporary(old, size, False, restored=True))
        else:
            remove_tree(old)
            out.append(Temporary(old, size, False))
    return out


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _held_path(path: Path) -> bool:
    """Whether a live process holds an flock on ``path``."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


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
    temporary folder if None), locked while this object lives; :meth:`remove` removes both.

    Removal is tied to the object from the moment its lock file exists: a signal that interrupts
    the code handing it on (``SIGTERM`` raised as ``SystemExit`` between two statements) drops the
    object, and its finalizer removes folder and lock, then, or at exit at the latest."""

    def __init__(self, parent: str | Path | None = None) -> None:
        parent = _scratch_parent(parent)
        parent.mkdir(parents=True, exist_ok=True)
        fd, lock = tempfile.mkstemp(prefix=SCRATCH_PREFIX, suffix=".lock", dir=parent)
        self._release = weakref.finalize(self, _release_scratch, fd, Path(lock[: -len(".lock")]))
        self.path = Path(lock[: -len(".lock")])
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # taken before the folder exists
            self.path.mkdir()
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        self._release()


def _release_scratch(fd: int, path: Path) -> None:
    _remove_with_lock(path)
    os.close(fd)  # the lock is released last


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

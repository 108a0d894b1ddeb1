"""One writer per store: an exclusive lock on ``.NAME.lock`` beside the store ``NAME``, held from a
writer's first check of the path to its commit or abort.  The file holds the holder's process id,
for the message a second writer gets.  The holder removes the file when it is done (while still
holding the lock); a waiter that then gets the lock of a removed file tries again with the new one,
so two writers never both believe they hold it.  A holder killed outright leaves the file, unlocked:
the next writer takes it over."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from .errors import StoreBusyError


def store_lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


class StoreLock:
    """Held from construction until :meth:`release`.  ``wait``: wait for another writer to finish
    (``log`` says so) instead of refusing."""

    def __init__(self, final: Path, wait: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.path = store_lock_path(final)
        self._fd: int | None = None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not wait:
                    os.close(fd)
                    raise StoreBusyError(f"{final} is being written by another process{holder}: wait for it to finish "
                                         "(--wait, or wait=True) or choose another store") from None
                if log is not None:
                    log(f"waiting for another process{holder} writing {final}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed it after we opened it: take the current one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # removed while held: see the module docstring
        finally:
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (process {text})" if text.isdigit() else ""


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

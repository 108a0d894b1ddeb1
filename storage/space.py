"""Room on a file system for a store: checked before a prefill writes it, and a file system that
fills up midway named as such (a KV store is large: 4.3 GB for 32K tokens of an 8B-shaped model).

Either way the caller gets a :class:`NoSpaceError` whose message says how much the store needs,
where, and how much is free; what was written is removed by the caller (an artifact's temporary
folder, a scratch store), so nothing is left behind."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# The write errors that mean "no room": the device is full, or the user's quota is.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


class NoSpaceError(OSError):
    """A store that cannot be written for lack of room; the message says what it needs and where."""


def free_bytes(location: str | Path) -> int | None:
    """Bytes free to this process on the file system that holds (or would hold) ``location``; None
    for a URL (an object store reports no free space)."""
    if "://" in str(location):
        return None
    path = Path(location).absolute()
    for folder in [path, *path.parents]:
        if folder.is_dir():
            return shutil.disk_usage(folder).free
    return None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def ensure_room(location: str | Path, needed: int, what: str) -> None:
    """Refuse to start writing ``what`` (about ``needed`` bytes) at ``location`` if its file system
    has less free; raises :class:`NoSpaceError`."""
    free = free_bytes(location)
    if free is not None and free < needed:
        raise NoSpaceError(f"{what} needs about {_size(needed)} at {location}, and that file system has {_size(free)} free: "
                           "free some space there or choose another location")


def is_no_room(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is a write refused for lack of room; libraries
    that do their own I/O (safetensors) say so only in their message."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _NO_ROOM:
            return True
        if not isinstance(error, OSError) and any(s in str(error) for s in ("No space left on device", "Disk quota exceeded")):
            return True
        error = error.__cause__ or error.__context__
    return False


def no_room(location: str | Path, needed: int, what: str) -> NoSpaceError:
    """The error for a file system that filled up while ``what`` was written (raise it ``from`` the
    write's own error)."""
    free = free_bytes(location)
    now = f" ({_size(free)} free now)" if free is not None else ""
    return NoSpaceError(f"the file system of {location} filled up while {what} was written{now}: it needs about {_size(needed)}; "
                        "nothing was kept.  Free some space there or choose another location")

"""Opening stored files without surprises: only regular files are opened (never a FIFO, device or
socket, which could block a reader forever; never through a symbolic link inside a store), and a
store's tree is checked for anything else before a library reads it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .checksums import CorruptChunkError


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of the regular file at ``path`` (``O_NONBLOCK``: opening a FIFO
    does not wait for a writer; ``O_NOFOLLOW``: the last component is no link); anything else is a
    :class:`CorruptChunkError` naming it.  ``FileNotFoundError`` and ``NotADirectoryError`` (a
    part of the path is a file) pass through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if isinstance(e, (FileNotFoundError, NotADirectoryError)):
            raise
        raise CorruptChunkError(f"{path} cannot be opened ({e.strerror}): the store is damaged; re-create it or restore "
                                "it from a copy") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CorruptChunkError(f"{path} is {_kind(mode)}, not a regular file: the store is damaged; re-create it or "
                                "restore it from a copy")
    return fd


def read_regular(path: str | Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file at ``path`` (at most ``limit``: a longer file is refused)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise CorruptChunkError(f"{path} has {size} bytes, more than the {limit} it may have: the store is damaged")
        chunks, got = [], 0
        while True:
            block = os.read(fd, max(1 << 20, size - got))
            if not block:
                return b"".join(chunks)
            chunks.append(block)
            got += len(block)
            if limit is not None and got > limit:
                raise CorruptChunkError(f"{path} grew past {limit} bytes while it was read: the store is damaged")
    finally:
        os.close(fd)


def check_tree(root: Path, what: str) -> None:
    """Every entry under ``root`` (itself included) is a folder or a regular file: no symbolic
    link, FIFO, socket or device (a library reading the store would follow or block on them)."""
    for entry in [root, *_walk(root)]:
        mode = os.lstat(entry).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise CorruptChunkError(f"{entry} in {what} is {_kind(mode)}: a store holds only folders and regular files; "
                                    "re-create it or restore it from a copy")


def _walk(root: Path):  # noqa: ANN202 (an iterator of paths, not following links)
    with os.scandir(root) as it:
        for e in it:
            yield Path(e.path)
            if e.is_dir(follow_symlinks=False):
                yield from _walk(Path(e.path))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"

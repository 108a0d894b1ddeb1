"""Opening stored files without surprises: only regular files are opened (never a FIFO, device or
socket, which could block a reader forever; never through a symbolic link inside a store), and a
store's tree is checked for anything else before a library reads it; fsyncs of a finished store."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from .checksums import CorruptChunkError
from .manifest import KV_STORE, MANIFEST, owned_files


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


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def missing_manifest(folder: Path, location: str | Path) -> str:
    hint = ""
    old = sorted(folder.parent.glob(f".{folder.name}.old-*")) if folder.parent.is_dir() else []
    if old:
        hint = (f" (a replacement was interrupted; the previous artifact is at {old[-1]}: the next prefill of this store "
                "puts it back, or rename it back yourself)")
    what = "no prefill artifact" if not folder.exists() else "an incomplete prefill artifact (no manifest.json)"
    return f"{what} at {location}{hint}"


def check_local_files(root: Path, manifest: dict[str, Any], location: str) -> None:
    """The folder holds only folders and regular files, and every file the manifest lists."""
    check_tree(root, location)
    files, kv = owned_files(manifest)
    for rel in sorted(files - {MANIFEST}) + [f"{KV_STORE}/{k}" for k in sorted(kv)]:
        try:
            mode = os.lstat(root / rel).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise CorruptChunkError(f"{rel} of {location} is missing: the store is damaged; re-run the prefill or restore it "
                                    "from a copy") from None
        if not stat.S_ISREG(mode):
            raise CorruptChunkError(f"{rel} of {location} is not a regular file: the store is damaged; re-run the prefill or "
                                    "restore it from a copy")

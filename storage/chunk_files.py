"""A local Zarr store's chunk files, written and read directly (bypassing zarr's async store).

Writes put a chunk's raw bytes in its file (what zarr writes for an uncompressed chunk) and record
its checksum in the store's :class:`~.checked_store.Ledger`.  Reads take byte ranges of files,
each verified against its own checksum (``slice_key``) or, where a range is a whole file, the
file's; neighbouring ranges of one file are read in one ``pread``, and several files are read on a
small thread pool (reads release the GIL).  Measured in bench/RESULTS.md (disk tier).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .checked_store import Ledger, slice_key
from .checksums import CorruptChunkError, crc32c_parts_hex
from .safe_files import open_regular

# Threads that read and write chunk files.
IO_THREADS = 8
# The longest a reader waits for one share of a read (regular files only: a file system that takes
# longer does not answer).
READ_TIMEOUT_S = 120
# Buffers one ``preadv`` scatters into (or ``writev`` gathers from) at most (IOV_MAX is 1024 on Linux).
MAX_IOV = 512


class ChunkFiles:
    """The chunk files under ``root``; keys are zarr's (``"L0/c.0.3.0.0"``; ``"L0/c/0/3/0/0"`` in older stores)."""

    def __init__(self, root: Path, ledger: Ledger, threads: int = IO_THREADS, durable: bool = False) -> None:
        self.root, self.ledger, self.threads = root, ledger, threads
        # Durable: each file is flushed to the device as soon as it is written (on the writing
        # thread), so that a persisted store's commit, which must fsync every file, finds little
        # left to write instead of the whole store.
        self.durable = durable
        self._pool: ThreadPoolExecutor | None = None
        self._dirs: set[Path] = set()

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="rcengine-disk")
        return self._pool

    def submit(self, fn, *args) -> Future:  # noqa: ANN001 (a background write)
        return self.pool().submit(fn, *args)

    def write(self, key: str, parts: list[np.ndarray], checksum: str | None = None) -> None:
        """One whole chunk file: the C-contiguous arrays ``parts`` end to end (``writev``, no copy),
        and its checksum (``checksum``, computed elsewhere, or here)."""
        path = self.root / key
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        bufs = [memoryview(p).cast("B") for p in parts]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(0, len(bufs), MAX_IOV):
                _write_all(fd, bufs[i : i + MAX_IOV])
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.ledger.checksums[key] = checksum if checksum is not None else crc32c_parts_hex(parts)

    def read_into(self, places: list[tuple[str, int]], dests: list[np.ndarray], whole_files: bool) -> list[int]:
        """Byte ranges at ``places`` ((key, offset) pairs), each as long as its destination (a
        writable contiguous array), read into ``dests`` and verified -> the bytes read per range:
        its size, less for a truncated file, -1 for a missing one (the caller says which).
        ``whole_files``: every range is a whole file, checksummed under its key.  Counts the bytes
        in the ledger."""
        by_file: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(places):
            by_file.setdefault(key, []).append(i)
        files = list(by_file.items())
        got = [-1] * len(places)

        def read_share(share: list[tuple[str, list[int]]]) -> None:
            for key, idx in share:
                self._read_file(key, [places[i][1] for i in idx], [dests[i] for i in idx], whole_files,
                                lambda j, n, idx=idx: got.__setitem__(idx[j], n))

        tasks = min(self.threads, len(files))
        if tasks <= 1:
            read_share(files)
        else:
            for f in [self.pool().submit(read_share, files[t::tasks]) for t in range(tasks)]:
                try:
                    f.result(timeout=READ_TIMEOUT_S)
                except TimeoutError:
                    raise CorruptChunkError(f"reading {self.ledger.location} took more than {READ_TIMEOUT_S} s: its file system "
                                            "does not answer") from None
        self.ledger.bytes_read += sum(n for n in got if n > 0)
        self.ledger.objects_read += sum(n >= 0 for n in got)
        return got

    def _read_file(self, key: str, offsets: list[int], dests: list[np.ndarray], whole_files: bool, done) -> None:  # noqa: ANN001
        """Ranges of one file into ``dests``; a run of ranges that follow each other is one
        ``preadv`` (scattered into its destinations).  ``done(j, nbytes)`` for each."""
        try:
            fd = open_regular(self.root / key)  # a FIFO or a link in its place is refused, never waited on
        except (FileNotFoundError, NotADirectoryError):
            return
        order = sorted(range(len(offsets)), key=offsets.__getitem__)
        try:
            run = 0
            while run < len(order):
                end = run + 1
                while (end < len(order) and end - run < MAX_IOV
                       and offsets[order[end]] == offsets[order[end - 1]] + dests[order[end - 1]].nbytes):
                    end += 1
                start = offsets[order[run]]
                bufs = [memoryview(dests[i]).cast("B") for i in order[run:end]]
                want = sum(b.nbytes for b in bufs)
                n = os.preadv(fd, bufs, start)
                while 0 < n < want:  # short reads happen on some file systems
                    more = os.preadv(fd, _after(bufs, n), start + n)
                    if more <= 0:
                        break
                    n += more
                first = 0  # the run's byte where buffer j starts
                for j, i in enumerate(order[run:end]):
                    size = bufs[j].nbytes
                    have = max(0, min(size, n - first))
                    if have == size:  # verified in place (the array itself: no copy)
                        self.ledger.verify(key if whole_files else slice_key(key, offsets[i]), dests[i])
                    done(i, have)
                    first += size
                run = end
        finally:
            os.close(fd)

    def close(self, cancel: bool = False) -> None:
        """Wait for the writes and reads in flight; ``cancel``: drop the queued ones first."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None


def _after(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The parts of the buffers ``bufs`` (one run) after its first ``n`` bytes."""
    out = []
    for b in bufs:
        if n >= b.nbytes:
            n -= b.nbytes
            continue
        out.append(b[n:])
        n = 0
    return out


def _write_all(fd: int, bufs: list[memoryview]) -> None:
    """``writev`` until every byte of ``bufs`` is written (short writes happen)."""
    want = sum(b.nbytes for b in bufs)
    n = os.writev(fd, bufs)
    while n < want:
        n += os.writev(fd, _after(bufs, n))

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

from .checked_store import Ledger, slice_key
from .checksums import crc32c_hex

# Threads that read and write chunk files.
IO_THREADS = 8


class ChunkFiles:
    """The chunk files under ``root``; keys are zarr's (``"L0/c/0/3/0/0"``)."""

    def __init__(self, root: Path, ledger: Ledger, threads: int = IO_THREADS) -> None:
        self.root, self.ledger, self.threads = root, ledger, threads
        self._pool: ThreadPoolExecutor | None = None
        self._dirs: set[Path] = set()

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="rcengine-disk")
        return self._pool

    def submit(self, fn, *args) -> Future:  # noqa: ANN001 (a background write)
        return self.pool().submit(fn, *args)

    def write(self, key: str, data: bytes) -> None:
        """One whole chunk file, and its checksum."""
        path = self.root / key
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        with open(path, "wb") as f:
            f.write(data)
        self.ledger.checksums[key] = crc32c_hex(data)

    def read(self, places: list[tuple[str, int]], size: int, whole_files: bool) -> list[bytes | None]:
        """Ranges of ``size`` bytes at ``places`` ((key, offset) pairs), each verified; None for a
        missing file, a short result for a truncated one (the caller says which).  ``whole_files``:
        every range is a whole file, checksummed under its key.  Counts the bytes in the ledger."""
        by_file: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(places):
            by_file.setdefault(key, []).append(i)
        files = list(by_file.items())
        out: list[bytes | None] = [None] * len(places)

        def read_share(share: list[tuple[str, list[int]]]) -> None:
            for key, idx in share:
                for i, data in zip(idx, self._read_file(key, [places[i][1] for i in idx], size, whole_files), strict=True):
                    out[i] = data

        tasks = min(self.threads, len(files))
        if tasks <= 1:
            read_share(files)
        else:
            for f in [self.pool().submit(read_share, files[t::tasks]) for t in range(tasks)]:
                f.result()
        self.ledger.bytes_read += sum(len(d) for d in out if d is not None)
        self.ledger.objects_read += sum(d is not None for d in out)
        return out

    def _read_file(self, key: str, offsets: list[int], size: int, whole_files: bool) -> list[bytes | None]:
        """Ranges of one file; a run of ranges that follow each other is one ``pread``."""
        try:
            fd = os.open(self.root / key, os.O_RDONLY)
        except FileNotFoundError:
            return [None] * len(offsets)
        out: list[bytes | None] = [None] * len(offsets)
        order = sorted(range(len(offsets)), key=offsets.__getitem__)
        try:
            run = 0
            while run < len(order):
                end = run + 1
                while end < len(order) and offsets[order[end]] == offsets[order[end - 1]] + size:
                    end += 1
                start, want = offsets[order[run]], (end - run) * size
                data = os.pread(fd, want, start)
                while 0 < len(data) < want:  # short reads happen on some file systems
                    more = os.pread(fd, want - len(data), start + len(data))
                    if not more:
                        break
                    data += more
                view = memoryview(data)
                for j, i in enumerate(order[run:end]):
                    block = bytes(view[j * size : (j + 1) * size])
                    if len(block) == size:
                        self.ledger.verify(key if whole_files else slice_key(key, offsets[i]), block)
                    out[i] = block
                run = end
        finally:
            os.close(fd)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

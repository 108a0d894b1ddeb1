"""Verified reads of fixed-size blocks of one file of a committed store (the FAISS selector's keys):
each block checked against its own CRC32C from the manifest."""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .checksums import CorruptChunkError, crc32c_hex
from .object_store import remote_errors
from .safe_files import open_regular


class BlockReader:
    """Verified reads of fixed-size blocks of one artifact file."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, name: str, location: str, entry: dict[str, Any]) -> None:
        self.fs, self.path, self.name, self.location = fs, path, name, location
        self.block_bytes: int = entry["block_bytes"]
        self.size: int = entry["bytes"]
        self._crcs: list[str] = entry["blocks"]
        self.bytes_read = 0

    @property
    def num_blocks(self) -> int:
        return len(self._crcs)

    def read(self, block: int) -> bytes:
        offset = block * self.block_bytes
        want = min(self.block_bytes, self.size - offset)
        try:
            if isinstance(self.fs, LocalFileSystem):
                fd = open_regular(self.path)
                try:
                    data = os.pread(fd, want, offset)
                finally:
                    os.close(fd)
            else:
                with remote_errors(self.location):
                    data = self.fs.cat_file(self.path, start=offset, end=offset + want)
        except FileNotFoundError:
            raise CorruptChunkError(f"file {self.name!r} of {self.location} is missing") from None
        if len(data) != want or crc32c_hex(data) != self._crcs[block]:
            raise CorruptChunkError(
                f"block {block} of file {self.name!r} of {self.location} fails its checksum: "
                "the artifact is corrupt; re-run the prefill or restore it from a copy"
            )
        self.bytes_read += len(data)
        return data

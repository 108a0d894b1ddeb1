"""CRC-32C checksums of stored objects, and the error raised when one does not match."""

from __future__ import annotations

import google_crc32c


class CorruptChunkError(IOError):
    """A stored object does not match its recorded checksum (or has none where one is required)."""


def crc32c_hex(data: bytes | memoryview) -> str:
    return f"{google_crc32c.value(bytes(data)):08x}"

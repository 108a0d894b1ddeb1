"""CRC-32C checksums of stored objects, and the error raised when one does not match."""

from __future__ import annotations

import google_crc32c
import numpy as np


class CorruptChunkError(IOError):
    """A stored object does not match its recorded checksum (or has none where one is required)."""


def crc32c_hex(data: bytes | memoryview | np.ndarray) -> str:
    """CRC-32C of ``data`` (a C-contiguous array is read in place, without a copy)."""
    if isinstance(data, np.ndarray) and data.flags.c_contiguous:
        return f"{google_crc32c.value(data.reshape(-1).view(np.uint8)):08x}"
    return f"{google_crc32c.value(bytes(data)):08x}"


def crc32c_parts_hex(parts: list[np.ndarray]) -> str:
    """CRC-32C of the C-contiguous arrays ``parts`` laid end to end (read in place)."""
    crc = 0
    for part in parts:
        crc = google_crc32c.extend(crc, part.reshape(-1).view(np.uint8))
    return f"{crc:08x}"

"""A Zarr store wrapper that checksums every object written and verifies every object read.

The checksums (CRC-32C, hex) live in a :class:`Ledger` shared by every copy zarr makes of the
wrapper; a persisted artifact stores the ledger in its manifest, and a reopened store verifies each
chunk as it is read: a flipped byte raises :class:`CorruptChunkError` naming the chunk, and the
bytes are never used.  The wrapper also counts the bytes the store returned (physical reads).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field

from zarr.abc.store import ByteRequest, RangeByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from .checksums import CorruptChunkError, crc32c_hex


def slice_key(key: str, offset: int) -> str:
    """The ledger's name for the byte range of ``key`` starting at ``offset`` (a block within a chunk)."""
    return f"{key}@{offset}"


@dataclass
class Ledger:
    """Checksums by store key, and the bytes read through the wrapper.

    ``strict``: every key read must have a checksum (a reopened artifact); otherwise keys written
    in this process are checksummed and verified, others pass (a fresh scratch store)."""

    checksums: dict[str, str] = field(default_factory=dict)
    strict: bool = False
    location: str = ""
    bytes_read: int = 0
    objects_read: int = 0

    def verify(self, key: str, data) -> None:  # noqa: ANN001 (bytes, a memoryview or a contiguous array)
        expected = self.checksums.get(key)
        if expected is None:
            if self.strict:
                raise CorruptChunkError(f"chunk {key!r} of {self.location} is not in the manifest: the store was altered after it was committed")
            return
        actual = crc32c_hex(data)
        if actual != expected:
            raise CorruptChunkError(
                f"chunk {key!r} of {self.location} fails its checksum (crc32c {actual}, manifest says {expected}): "
                "the file is corrupt; re-create the store (rcengine prefill) or restore it from a copy"
            )


def _is_metadata(key: str) -> bool:
    """A key zarr reads for metadata (v3 ``zarr.json``, v2 ``.zgroup`` and kin)."""
    name = key.rsplit("/", 1)[-1]
    return name == "zarr.json" or name.startswith(".z")


class CheckedStore(WrapperStore):
    """Wraps any zarr v3 store (local folder, fsspec URL, memory)."""

    def __init__(self, store, ledger: Ledger | None = None) -> None:  # noqa: ANN001 (any zarr Store)
        super().__init__(store)
        self.ledger = ledger if ledger is not None else Ledger(location=str(store))

    def _with_store(self, store):  # noqa: ANN001, ANN202 (zarr copies wrappers; keep one ledger)
        return type(self)(store, self.ledger)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None:
            # A reopened artifact holds every object it will ever read: a missing chunk is damage,
            # never zarr's fill value.  Only metadata keys zarr probes for may be absent.
            if self.ledger.strict and (key in self.ledger.checksums or not _is_metadata(key)):
                raise CorruptChunkError(f"chunk {key!r} of {self.ledger.location} is missing: the store is damaged; re-create "
                                        "it (rcengine prefill) or restore it from a copy")
            return None
        raw = buf.as_numpy_array().tobytes()
        if byte_range is None:
            self.ledger.verify(key, raw)
        elif isinstance(byte_range, RangeByteRequest) and slice_key(key, byte_range.start) in self.ledger.checksums:
            self.ledger.verify(slice_key(key, byte_range.start), raw)  # a block with a checksum of its own
        elif self.ledger.strict:
            raise CorruptChunkError(f"partial read of {key!r} at {byte_range}: no checksum covers it")
        self.ledger.bytes_read += len(raw)
        self.ledger.objects_read += 1
        return buf

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, rng) for key, rng in key_ranges)))

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        requests = list(requests)
        results = await asyncio.gather(*(self.get(key, prototype, rng) for key, prototype, rng in requests))
        for (key, _, _), buf in zip(requests, results, strict=True):
            yield key, buf

    async def set(self, key: str, value: Buffer) -> None:
        self.ledger.checksums[key] = crc32c_hex(value.as_numpy_array().tobytes())
        await self._store.set(key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if not await self._store.exists(key):
            await self.set(key, value)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        self.ledger.checksums.pop(key, None)
        await self._store.delete(key)

"""The disk tier's writes (:class:`DiskWrites`, a part of :class:`~.disk_tier.DiskTier`): appended
rows wait in host memory until they fill a chunk, which is then written, to a local store on
background threads (chunk files written once, from the pieces the rows came in), elsewhere through
zarr; :meth:`flush` writes the rest and the array metadata.  See disk_tier.py for the whole."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from .checked_store import slice_key
from .checksums import crc32c_parts_hex
from .device_checksums import DeviceChecksums
from .defaults import WRITE_BACKLOG_BYTES
from .pending_rows import Piece, Segments, stage
from .rows import pack
from .tier import check_append

# Device types on which the rows a prefill appends get their checksums computed where they are
# (device_checksums.py): on the host, CRC holds the GIL the prefill's own Python needs.
DEVICE_CHECKSUMS = ("cuda",)


@dataclass
class WriteStats:
    """Where a store's writing time went, in seconds: ``waited`` by the appending thread (for the
    backlog, or for every write at a flush); summed over the writer threads, ``copy`` waiting for
    rows still being copied from the device, ``io`` in writes and fsyncs, ``checksums`` in
    block checksums.  ``bytes``: chunk bytes written."""

    waited: float = 0.0
    copy: float = 0.0
    io: float = 0.0
    checksums: float = 0.0
    bytes: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **seconds: float) -> None:
        with self._lock:
            for name, value in seconds.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, float]:
        return {"waited_ms": 1e3 * self.waited, "copy_ms": 1e3 * self.copy, "io_ms": 1e3 * self.io,
                "checksums_ms": 1e3 * self.checksums, "bytes": self.bytes}


class DiskWrites:
    """Appending and writing (a part of DiskTier: its state is set up by DiskTier.__init__)."""

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Rows from any device.  From a CUDA device they are copied to host memory asynchronously
        (no host sync: a prefill keeps launching while they are copied and written)."""
        check_append(self.layout, layer, keys, values, positions)
        n, b = self.num_rows(layer), self.block_tokens
        if n % b:  # the last block, cached while partly filled, gains rows
            self.cache.discard_blocks(layer, n // b, n // b + 1)
        m, s = keys.shape[1], self.chunk_tokens
        if (keys.device.type in DEVICE_CHECKSUMS and self._files is not None and not self.read_only
                and m and m % s == 0 and n % s == 0):  # whole chunk files: checksummed on the device
            if self._device_checks is None or self._device_checks.device != keys.device:
                self._device_checks = DeviceChecksums(self._block_bytes, self.chunk_heads * s // b, keys.device)
            piece = stage(pack(keys, values), self._device_checks, b, s, self.chunk_heads)
        else:
            piece = stage(pack(keys, values))
        self._pending[layer].add(piece)
        self._positions[layer].append(positions.detach().cpu().numpy().astype(np.int64))
        if not self.read_only:
            self._write_full_chunks(layer)

    @property
    def append_unit(self) -> int:
        """Rows per append that let the tier write whole chunk files as they come (checksummed on
        the device): a prefill streaming its rows appends multiples of this (RCCache)."""
        return self.chunk_tokens

    def _write_full_chunks(self, layer: int) -> None:
        s = self.chunk_tokens
        full = self._pending[layer].rows // s
        if full == 0:
            return
        first = self._flushed_chunks[layer]
        pieces = self._pending[layer].take(full * s)
        if self._files is not None:  # background writes, straight to the chunk files
            nbytes = sum(p.data.nbytes for p in pieces)
            self._throttle(nbytes)
            self._writes.append((self._files.submit(self._write_chunks, layer, first, pieces), nbytes))
        else:
            rows = np.concatenate([p.wait() for p in pieces], axis=1)
            arr = self._arrays[layer]
            stop = (first + full) * s
            if arr.shape[1] < stop:
                arr.resize((arr.shape[0], stop, *arr.shape[2:]))
            arr[:, first * s : stop] = rows
            self._record_block_checksums(layer, first * s, Segments([Piece(rows)]), rows.shape[1])
        self._flushed_chunks[layer] += full

    def _throttle(self, nbytes: int) -> None:
        """Wait for the oldest background writes while more than WRITE_BACKLOG_BYTES would be queued."""
        queued = sum(n for _, n in self._writes)
        t0 = time.perf_counter()
        while self._writes and queued + nbytes > WRITE_BACKLOG_BYTES:
            done, n = self._writes.pop(0)
            done.result()  # re-raises a failed write here
            queued -= n
        self.write_stats.add(waited=time.perf_counter() - t0)

    def _write_chunks(self, layer: int, first: int, pieces: list[Piece]) -> None:
        """Write whole chunks from chunk ``first`` on, from ``pieces`` (``(Hkv, r, 2, d)`` each, whole
        chunks in all), as files (what zarr writes for an uncompressed chunk: its raw little-endian
        bytes, C order), with a checksum of each file and of each (head, block) byte range in it:
        the pieces' own (computed on the device) where every piece brings them, else computed here."""
        s, hc, b, h = self.chunk_tokens, self.chunk_heads, self.block_tokens, self.layout.num_kv_heads
        count, nbytes = sum(p.rows for p in pieces), sum(p.data.nbytes for p in pieces)
        t0 = time.perf_counter()
        rows = Segments(pieces)  # waits for the copies from the device
        t1 = time.perf_counter()
        checked = all(p.block_crcs is not None for p in pieces)
        if checked:  # (chunks, head groups) file and (Hkv, blocks) block checksums, in order
            file_crcs = np.concatenate([p.file_crcs for p in pieces]).tolist()
            block_crcs = np.concatenate([p.block_crcs for p in pieces], axis=1)
            # A file's blocks, in file order (head, then block), are ranges at the same offsets in
            # every file: their ledger names are the file's key and these suffixes.
            suffixes = [slice_key("", ((i // (s // b)) * s + (i % (s // b)) * b) * self._row_bytes) for i in range(hc * s // b)]
        for j in range(count // s):
            for g in range(h // hc):
                key = self._chunk_key(layer, g, first + j)
                parts = [x for head in range(g * hc, (g + 1) * hc) for x in rows.head_slices(head, j * s, (j + 1) * s)]
                self._files.write(key, parts, checksum=f"{file_crcs[j][g]:08x}" if checked else None)
                if checked and not self._block_is_file:
                    crcs = block_crcs[g * hc : (g + 1) * hc, j * s // b : (j + 1) * s // b].reshape(-1).tolist()
                    self.store.ledger.checksums.update(zip([key + x for x in suffixes], [f"{c:08x}" for c in crcs], strict=True))
        t2 = time.perf_counter()
        if not checked:
            self._record_block_checksums(layer, first * s, rows, count)
        self.write_stats.add(copy=t1 - t0, io=t2 - t1, checksums=time.perf_counter() - t2, bytes=nbytes)

    def _record_block_checksums(self, layer: int, start: int, rows: Segments, count: int) -> None:
        """Checksums of the (head, block) byte ranges of rows ``start..start + count`` (whole
        blocks only; ``start`` is a block boundary), held by ``rows`` from row 0."""
        if self._block_is_file:
            return  # a block is a whole file, checksummed as such
        b, checksums = self.block_tokens, self.store.ledger.checksums
        for lo in range(0, count - count % b, b):
            block = (start + lo) // b
            for head in range(self.layout.num_kv_heads):
                key, offset = self._block_location(layer, head, block)
                checksums[slice_key(key, offset)] = crc32c_parts_hex(rows.head_slices(head, lo, lo + b))

    def _wait_for_writes(self) -> None:
        writes, self._writes = self._writes, []
        t0 = time.perf_counter()
        for w, _ in writes:
            w.result()  # re-raises a failed write here
        self.write_stats.add(waited=time.perf_counter() - t0)

    def flush(self) -> None:
        """Write everything appended so far, the last partial chunks and the positions included, so
        that the store reopens with every row.  The partial chunks stay in memory too, so further
        appends can complete them."""
        if self.read_only:
            raise PermissionError("this KV store was opened read-only; rows appended to it stay in memory")
        self._wait_for_writes()
        layers = range(self.layout.num_layers)
        if self._files is not None:  # a local store: every layer's few small writes at once
            for done in [self._files.submit(self._flush_layer, layer) for layer in layers]:
                done.result()
        else:
            for layer in layers:
                self._flush_layer(layer)

    def _flush_layer(self, layer: int) -> None:
        s, arr = self.chunk_tokens, self._arrays[layer]
        start = self._flushed_chunks[layer] * s
        rows = start + self._pending[layer].rows
        if arr.shape[1] != rows:
            arr.resize((arr.shape[0], rows, *arr.shape[2:]))
        if rows > start:
            pending = self._pending[layer].array()
            arr[:, start:rows] = pending
            self._record_block_checksums(layer, start, Segments([Piece(pending)]), rows - start)
        if int(arr.attrs.get("rows", -1)) != rows:
            arr.attrs["rows"] = rows
        pos = self._pos_arrays[layer]
        written = self._positions_written[layer]
        if pos.shape[0] != rows:
            pos.resize((rows,))
        if rows > written:
            pos[written:rows] = self.positions(layer)[written:rows]
        self._positions_written[layer] = rows

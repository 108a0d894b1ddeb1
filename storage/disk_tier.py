"""The disk tier: mid-region rows in a Zarr v3 store, read in blocks through a bounded cache.

Layout (one store per sequence; ``bench/disk_layout.py`` and ``bench/disk_decode.py`` hold the
measurements behind it):

- root group attributes: format, version, layout (layers, KV heads, head dim, dtype), the block
  (``block_tokens``: the unit read, and the unit the disk's block selector selects) and the chunk
  (``chunk_tokens`` neighbouring tokens of ``chunk_heads`` KV heads: one file);
- ``L{layer}``: ``(Hkv, rows, 2, d)`` raw bits of the model's dtype, uncompressed, in chunks of
  ``(chunk_heads, chunk_tokens, 2, d)``: a block of one head is a contiguous byte range of its
  chunk, read on its own (``pread``) and verified against its own checksum;
- ``P{layer}``: ``(rows,)`` int64 token positions.

Version 2 writes every KV head of ``chunk_tokens`` (16 blocks by default) tokens into one file: at 64
tokens a block that is 128x fewer files than version 1's one file per block and head (which the
reader still reads: ``chunk_heads`` 1, ``chunk_tokens == block_tokens``).  Creating files, not
writing bytes, bounded a prefill to disk (bench/RESULTS.md).

The block cache (:class:`~.block_pool.BlockPool`) holds blocks in slots the compute device reads
in place.  A decode step finds its blocks there with tensor operations (:meth:`resolve`: no host
work while every block is resident, so the step can be a CUDA graph); the blocks it misses are read
between its runs (:meth:`fill_missed`), straight into slots (one ``preadv`` per run of neighbouring
blocks of a file, on a small thread pool; zarr's byte-range gets for other stores), each verified
against its checksum.  A gather (host reads: dense on disk, FAISS, housekeeping) copies rows out of
resident blocks, reads the others in concurrent batches and offers them to the cache.  A selector
whose units are the store's blocks reads exactly what it asks for.

Appended rows wait in host memory until they fill a chunk, which is then written: to a local store
on background threads (chunk files written directly, once, from the pieces the rows came in, so
that writes overlap the caller's compute, and flushed to the device there if the store is to be
persisted; at most WRITE_BACKLOG_BYTES queued; :meth:`flush` waits for them and writes the array
metadata), elsewhere through zarr.  Rows appended from a CUDA device are copied into pinned memory
without a host sync (:mod:`.pending_rows`): the writer waits for the copy, not the caller; appends
of whole chunk files (a prefill's, :attr:`append_unit`) bring their checksums, computed on the
device (:mod:`.device_checksums`), so that the writers hold no GIL for CRC.  Only
a writable store is written; a committed artifact is never modified, so rows appended to a reopened
store stay in memory and are metered as tier ``cpu``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from .block_pool import BlockPool
from .chunk_files import ChunkFiles
from .checked_store import CheckedStore, Ledger, slice_key
from .checksums import CorruptChunkError, crc32c_parts_hex
from .device_checksums import DeviceChecksums
from .errors import ArtifactError
from .kv_metadata import FORMAT, checked_metadata
from .defaults import DEFAULT_BLOCK_TOKENS, DEFAULT_CACHE_BYTES, DEFAULT_CHUNK_BLOCKS, POSITION_CHUNK, WRITE_BACKLOG_BYTES
from .meter import ByteMeter, Counters, process_disk_read_bytes
from .pending_rows import PendingRows, Piece, Segments, stage
from .rows import dtype_name, from_raw_numpy, pack, raw_numpy_dtype
from .tier import TierLayout, check_append

VERSION = 2
# Chunk files named ``L{layer}/c.{head group}.{chunk}.0.0``: one folder per layer, not two per chunk
# (zarr's default "/" separator made 2,048 folders of a 32K-token 8B-shaped store, each created and
# flushed at the commit).  Stores keep their encoding in their metadata; older ones still open.
CHUNK_KEYS = {"name": "default", "separator": "."}
# Device types on which the rows a prefill appends get their checksums computed where they are
# (device_checksums.py): on the host, CRC holds the GIL the prefill's own Python needs.
DEVICE_CHECKSUMS = ("cuda",)
# A gather reads the blocks it misses in concurrent batches of at most this many bytes.
READ_BATCH_BYTES = 64 << 20


def open_store(location: str | Path, read_only: bool):  # noqa: ANN201 (a zarr Store)
    """A local folder (the default) or any fsspec URL, e.g. ``memory://kv`` or ``s3://bucket/kv``."""
    loc = str(location)
    if "://" in loc and not loc.startswith("file://"):
        return FsspecStore.from_url(loc, read_only=read_only)
    return LocalStore(loc.removeprefix("file://"), read_only=read_only)


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


class DiskTier:
    name = "disk"

    def __init__(
        self,
        store: CheckedStore,
        layout: TierLayout,
        block_tokens: int,
        cache_bytes: int,
        compute_device: torch.device | str,
        meter: ByteMeter | None,
        read_only: bool,
        chunk_tokens: int | None = None,
        chunk_heads: int | None = None,
        durable: bool = False,
        carry: "DiskTier | None" = None,
    ) -> None:
        self.store = store
        self.layout = layout
        self.block_tokens = block_tokens
        self.chunk_tokens = chunk_tokens or block_tokens
        self.chunk_heads = chunk_heads or layout.num_kv_heads
        self.compute_device = torch.device(compute_device)
        self.cache = BlockPool(layout, block_tokens, cache_bytes, self.compute_device)
        self._filled = np.zeros(layout.num_layers, np.int64)  # blocks read into the cache this step, per layer
        self._counts: np.ndarray | None = None  # the flags' counts after a step's last run (fill_missed)
        self.meter = meter if meter is not None else ByteMeter()
        self.read_only = read_only
        self._raw = raw_numpy_dtype(layout.dtype)
        self._row_bytes = layout.row_bytes
        self._block_bytes = block_tokens * self._row_bytes
        self._block_is_file = self.chunk_tokens == block_tokens and self.chunk_heads == 1  # format 1
        self._group = zarr.open_group(store, mode="r" if read_only else "r+")
        # Every chunk is written, zeros too, so that every stored chunk has a checksum.
        self._arrays = [self._group[f"L{i}"].with_config({"write_empty_chunks": True}) for i in range(layout.num_layers)]
        self._pos_arrays = [self._group[f"P{i}"] for i in range(layout.num_layers)]
        d, h = layout.head_dim, layout.num_kv_heads
        self._flushed_chunks = [0] * layout.num_layers  # whole chunks held by the store
        self._pending = [PendingRows(h, d, self._raw) for _ in range(layout.num_layers)]  # rows past the whole chunks
        self._positions: list[list[np.ndarray]] = [[] for _ in range(layout.num_layers)]  # parts, joined when read
        self._positions_written = [0] * layout.num_layers
        inner = store._store
        # A local store's chunk files are read and written directly (chunk_files.py).
        self._files = ChunkFiles(Path(inner.root), store.ledger, durable=durable) if isinstance(inner, LocalStore) else None
        self._writes: list[tuple[Future, int]] = []  # background chunk writes and their bytes, oldest first
        self.write_stats = WriteStats()
        self._device_checks: DeviceChecksums | None = None
        self._chunk_keys: dict[tuple[int, int, int], str] = {}
        if carry is not None:  # the rows the writer of this store holds in memory: not read back
            self._flushed_chunks, self._pending = list(carry._flushed_chunks), carry._pending
            self._positions, self._positions_written = carry._positions, list(carry._positions_written)
            self._chunk_keys = carry._chunk_keys
        else:
            for layer, arr in enumerate(self._arrays):
                self._load_tail(layer, int(arr.attrs.get("rows", 0)))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        location: str | Path,
        layout: TierLayout,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        compute_device: torch.device | str = "cpu",
        meter: ByteMeter | None = None,
        overwrite: bool = False,
        chunk_tokens: int | None = None,
        chunk_heads: int | None = None,
        durable: bool = False,
    ) -> "DiskTier":
        """A new, empty store at ``location`` (refused if one exists there, unless ``overwrite``).
        ``chunk_tokens`` (a multiple of ``block_tokens``; default DEFAULT_CHUNK_BLOCKS blocks) tokens
        of ``chunk_heads`` KV heads (default all; 1 or all) make one chunk file.  ``durable``: a
        store to be committed (persisted) flushes each chunk file to the device as it is written,
        in the background, rather than all of them at the commit."""
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if chunk_tokens is None:
            chunk_tokens = block_tokens * DEFAULT_CHUNK_BLOCKS
        if chunk_tokens < block_tokens or chunk_tokens % block_tokens:
            raise ValueError(f"chunk_tokens must be a multiple of block_tokens ({block_tokens}), got {chunk_tokens}")
        heads = chunk_heads or layout.num_kv_heads
        if heads not in (1, layout.num_kv_heads):
            raise ValueError(f"chunk_heads must be 1 or {layout.num_kv_heads}, got {chunk_heads}")
        store = CheckedStore(open_store(location, read_only=False), Ledger(location=str(location)))
        attrs = {
            "format": FORMAT, "version": VERSION, "num_layers": layout.num_layers,
            "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
            "dtype": dtype_name(layout.dtype), "block_tokens": block_tokens, "chunk_tokens": chunk_tokens, "chunk_heads": heads,
        }
        try:
            group = zarr.create_group(store, attributes=attrs, overwrite=overwrite)
        except zarr.errors.ContainsGroupError as e:
            raise FileExistsError(f"a store already exists at {location}: choose another location or overwrite it") from e
        raw = raw_numpy_dtype(layout.dtype)
        for layer in range(layout.num_layers):
            group.create_array(
                f"L{layer}", shape=(layout.num_kv_heads, 0, 2, layout.head_dim), dtype=raw,
                chunks=(heads, chunk_tokens, 2, layout.head_dim), compressors=None, fill_value=0,
                attributes={"rows": 0}, chunk_key_encoding=CHUNK_KEYS,
            )
            group.create_array(f"P{layer}", shape=(0,), dtype=np.int64, chunks=(POSITION_CHUNK,), compressors=None, fill_value=0)
        return cls(store, layout, block_tokens, cache_bytes, compute_device, meter, read_only=False,
                   chunk_tokens=chunk_tokens, chunk_heads=heads, durable=durable)

    @staticmethod
    def bytes_for(layout: TierLayout, rows: int, block_tokens: int, chunk_tokens: int | None = None) -> int:
        """What a store of ``rows`` rows a layer takes on disk: whole chunk files (the last one is
        written whole) and the positions' chunks."""
        s = chunk_tokens or block_tokens * DEFAULT_CHUNK_BLOCKS
        row_bytes = layout.num_kv_heads * layout.row_bytes
        return layout.num_layers * (-(-rows // s) * s * row_bytes + -(-rows // POSITION_CHUNK) * POSITION_CHUNK * 8)

    @staticmethod
    def blocks_bytes(layout: TierLayout, rows: int, block_tokens: int) -> int:
        """Bytes of every block of a store of ``rows`` rows a layer: the most a block cache can hold."""
        return layout.num_layers * layout.num_kv_heads * -(-rows // block_tokens) * block_tokens * layout.row_bytes

    @classmethod
    def open(
        cls,
        location: str | Path,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        compute_device: torch.device | str = "cpu",
        meter: ByteMeter | None = None,
        checksums: dict[str, str] | None = None,
        carry: "DiskTier | None" = None,
        layout: TierLayout | None = None,
        rows: int | None = None,
    ) -> "DiskTier":
        """Reopen a store read-only.  With ``checksums`` (from an artifact's manifest) every object
        read must match its checksum; without, nothing can be verified.  ``carry``: the tier that
        wrote this store (flushed, then moved here by a commit), whose positions and last partial
        chunks are taken over instead of read back.  ``layout`` and ``rows`` (per layer), where the
        caller knows them, are checked against the store's metadata before anything is read or
        allocated by it (``kv_metadata.py``); the block cache is no larger than the store."""
        ledger = Ledger(checksums=dict(checksums or {}), strict=checksums is not None, location=str(location))
        store = CheckedStore(open_store(location, read_only=True), ledger)
        try:
            group = zarr.open_group(store, mode="r")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no KV store at {location}") from e
        except CorruptChunkError:
            raise
        except Exception as e:  # noqa: BLE001 (zarr raises many types for metadata it cannot parse)
            raise ArtifactError(f"the KV store {location} is malformed (its metadata does not read: {type(e).__name__}): "
                                "re-create it (rcengine prefill) or restore it from a copy") from None
        meta = checked_metadata(group, str(location), layout, rows)
        b, layout = meta.block_tokens, meta.layout
        if carry is not None and (carry.layout, carry.block_tokens, carry.chunk_tokens, carry.chunk_heads) != (
                layout, b, meta.chunk_tokens, meta.chunk_heads):
            raise ValueError(f"the store at {location} is not the one the carried tier wrote")
        cache_bytes = min(cache_bytes, cls.blocks_bytes(layout, max(meta.rows), b))  # a larger cache would never fill
        return cls(store, layout, b, cache_bytes, compute_device, meter, read_only=True, chunk_tokens=meta.chunk_tokens,
                   chunk_heads=meta.chunk_heads, carry=carry)

    def _load_tail(self, layer: int, rows: int) -> None:
        """On open: whole chunks stay in the store; the last, partial chunk is read into memory."""
        s = self.chunk_tokens
        full = rows // s
        self._flushed_chunks[layer] = full
        if rows > full * s:
            self._pending[layer].add(Piece(np.ascontiguousarray(self._arrays[layer][:, full * s : rows])))
        self._positions[layer] = [np.asarray(self._pos_arrays[layer][:rows], dtype=np.int64)]
        self._positions_written[layer] = rows

    # -- writing ------------------------------------------------------------------------------

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

    # -- reading ------------------------------------------------------------------------------

    def num_rows(self, layer: int) -> int:
        return self._flushed_chunks[layer] * self.chunk_tokens + self._pending[layer].rows

    def positions(self, layer: int) -> np.ndarray:
        parts = self._positions[layer]
        if len(parts) != 1:
            self._positions[layer] = parts = [np.concatenate(parts) if parts else np.zeros(0, np.int64)]
        return parts[0]

    def _block_location(self, layer: int, head: int, block: int) -> tuple[str, int]:
        """The chunk file holding block ``block`` of ``head``, and the block's byte offset in it."""
        s, hc, b = self.chunk_tokens, self.chunk_heads, self.block_tokens
        return self._chunk_key(layer, head // hc, block * b // s), ((head % hc) * s + block * b % s) * self._row_bytes

    def _chunk_key(self, layer: int, head_group: int, chunk: int) -> str:
        key = self._chunk_keys.get((layer, head_group, chunk))
        if key is None:  # zarr's encoding costs microseconds; a step reads thousands of blocks
            arr = self._arrays[layer]
            key = self._chunk_keys[layer, head_group, chunk] = f"{arr.path}/{arr.metadata.encode_chunk_key((head_group, chunk, 0, 0))}"
        return key

    def _read_into(self, layer: int, wanted: list[tuple[int, int]], dests: list[np.ndarray]) -> None:
        """Read blocks ``(head, block)`` into ``dests`` (``(block, 2, d)`` raw arrays), concurrently;
        each is verified against its checksum.

        A local store's files are read directly (:class:`~.chunk_files.ChunkFiles`), into the
        destinations; other stores through zarr's concurrent byte-range gets."""
        if not wanted:
            return
        places = [self._block_location(layer, h, blk) for h, blk in wanted]
        size = self._block_bytes
        if self._files is not None:
            got = self._files.read_into(places, dests, whole_files=self._block_is_file)
        else:
            proto = default_buffer_prototype()

            async def fetch() -> list:
                return await asyncio.gather(*(self.store.get(key, proto, RangeByteRequest(off, off + size)) for key, off in places))

            got = []
            for buf, dest in zip(sync(fetch()), dests, strict=True):
                data = None if buf is None else buf.to_bytes()
                if data is not None and len(data) == size:
                    dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
                got.append(-1 if data is None else len(data))
        for n, (key, _) in zip(got, places, strict=True):
            if n != size:
                what = "is missing" if n < 0 else f"is truncated ({n} of {size} bytes of a block)"
                raise CorruptChunkError(f"chunk {key!r} of {self.store.ledger.location} {what}: "
                                        "re-create the store (rcengine prefill) or restore it from a copy")

    def _read_blocks(self, layer: int, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """Blocks ``(head, block)`` read into new arrays ``(block, 2, d)`` (see :meth:`_read_into`)."""
        shape = (self.block_tokens, 2, self.layout.head_dim)
        out = {hb: np.empty(shape, self._raw) for hb in wanted}
        self._read_into(layer, wanted, list(out.values()))
        return out

    def _memory_block(self, layer: int, head: int, block: int, dest: np.ndarray) -> None:
        """A block past the store's whole chunks, from the rows held in memory (zeros past the last)."""
        b, stored = self.block_tokens, self._flushed_chunks[layer] * self.chunk_tokens
        rows = self._pending[layer].array()[head, block * b - stored : (block + 1) * b - stored]
        dest[: rows.shape[0]] = rows
        dest[rows.shape[0] :] = 0

    def gather(self, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids: (Hkv, K)`` int64 row ids -> keys, values ``(Hkv, K, d)`` on the compute device.

        Blocks in the cache are copied from; the others are read concurrently, several heads' at a
        time (batches of at most READ_BATCH_BYTES), and offered to the cache."""
        lay, b = self.layout, self.block_tokens
        if self._writes:
            self._wait_for_writes()
        ids_np = ids.detach().cpu().numpy().astype(np.int64, copy=False)
        h, k = ids_np.shape
        n = self.num_rows(layer)
        if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= n):
            raise IndexError(f"row ids must lie in 0..{n - 1} for layer {layer}, got {ids_np.min()}..{ids_np.max()}")
        stored = self._flushed_chunks[layer] * self.chunk_tokens
        out = np.empty((h, k, 2, lay.head_dim), self._raw)
        disk_before, bytes_before = process_disk_read_bytes(), self.store.ledger.bytes_read
        in_store = ids_np < stored
        hits = misses = 0
        self.cache.tick()  # blocks this gather copies from stay cached until it is done
        # Head by head, each head's rows copied out of a stack of its blocks in one indexing; the
        # misses of several heads are read in one concurrent batch of at most READ_BATCH_BYTES, so
        # that a gather holds at most that much beyond the cache and its output.
        plans = []
        for head in range(h):
            idh = ids_np[head][in_store[head]]
            blocks, where = np.unique(idh // b, return_inverse=True)
            found = [self.cache.get(layer, head, blk) for blk in blocks.tolist()]
            missing = [(head, blk) for blk, arr in zip(blocks.tolist(), found, strict=True) if arr is None]
            plans.append((blocks, where, found, missing))
        batch: list[int] = []
        for head in range(h + 1):
            if batch and (head == h or sum(len(plans[x][3]) for x in batch) * self._block_bytes
                          + len(plans[head][3]) * self._block_bytes > READ_BATCH_BYTES):
                fresh = self._read_blocks(layer, [hb for x in batch for hb in plans[x][3]])
                for x in batch:
                    blocks, where, found, missing = plans[x]
                    for i, blk in enumerate(blocks.tolist()):
                        if found[i] is None:
                            found[i] = fresh[x, blk]
                            self.cache.put(layer, x, blk, found[i])
                    sel = np.nonzero(in_store[x])[0]
                    if sel.size:
                        out[x, sel] = np.stack(found)[where.reshape(-1), ids_np[x, sel] % b]
                    hits += len(blocks) - len(missing)
                    misses += len(missing)
                    plans[x] = None
                del fresh
                batch = []
            if head < h:
                batch.append(head)
        rest = ~in_store
        if rest.any():
            heads = np.broadcast_to(np.arange(h)[:, None], (h, k))
            out[rest] = self._pending[layer].array()[heads[rest], ids_np[rest] - stored]
        disk_after = process_disk_read_bytes()
        store_rows = int(in_store.sum())

        rb = lay.row_bytes
        to_device = self.compute_device.type == "cuda"
        disk_read = 0 if disk_before is None or disk_after is None else disk_after - disk_before
        self.meter.record("disk", layer, Counters(
            logical=store_rows * rb, physical=self.store.ledger.bytes_read - bytes_before,
            h2d=store_rows * rb if to_device else 0, disk_read=disk_read,
            cache_hits=hits, cache_misses=misses,
            rows=store_rows, gathers=1,
        ))
        memory_rows = h * k - store_rows
        if memory_rows:
            self.meter.record("cpu", layer, Counters(
                logical=memory_rows * rb, physical=memory_rows * rb, h2d=memory_rows * rb if to_device else 0, rows=memory_rows,
            ))
        rows_t = from_raw_numpy(out, lay.dtype).to(self.compute_device)
        return rows_t[:, :, 0], rows_t[:, :, 1]

    # -- reading in place, on the compute device ----------------------------------------------

    @property
    def reads_in_place(self) -> bool:
        """Whether a decode step can read selected blocks in place from the block cache
        (:meth:`resolve`), with no host work unless a block is missing."""
        return self.cache.device_readable

    @property
    def version(self) -> int:
        """Changes when a buffer a captured step reads (the cache's table or flags) is replaced."""
        return self.cache.version

    def reserve(self, rows: int) -> None:
        """A block table that covers ``rows`` rows per layer (between steps)."""
        self.cache.reserve(rows)

    def begin_step(self) -> None:
        """Start a step that reads in place: a new stamp for the blocks it uses, no blocks filled yet.
        The step itself then clears the cache's flags (:meth:`BlockPool.begin_step`)."""
        self.cache.tick()
        self.cache.sync()  # what host reads and evictions changed since the last step
        self._filled[:] = 0
        self._counts = None
        self.cache.view  # noqa: B018 (allocated here, never inside a graph capture)

    def resolve(self, layer: int, blocks: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        """Slots of ``blocks: (T, Hkv, X)`` (those ``wanted``) in the cache's :attr:`BlockPool.view`,
        ``(T, Hkv, X)`` int64.  Deferred (a captured step): tensor operations only; missing blocks
        get -1 and are filled by :meth:`fill_missed` before the step runs again.  Otherwise missing
        blocks are read now (a host sync) and every wanted block is resident."""
        pool = self.cache
        if not pool.deferred:
            pool.tick()  # an eager step needs only this layer's blocks resident at once
            pool.sync()
        slots = pool.lookup(layer, blocks, wanted)
        if pool.deferred:
            return slots
        miss = wanted & (slots < 0)
        if bool(miss.any()):
            head = torch.arange(blocks.shape[-2], device=blocks.device)[:, None].expand_as(blocks)
            pairs = torch.stack([head[miss], blocks[miss]], dim=1).unique(dim=0).cpu().tolist()
            self._fill(layer, [(h, blk) for h, blk in pairs], transient=True)
            pool.sync()
            slots = pool.lookup(layer, blocks, wanted)
        return slots

    def fill_missed(self) -> bool:
        """After a deferred run of a step: read the blocks it missed into the cache -> whether it
        must run again (one host sync)."""
        self._counts = self.cache.step_counts()  # (2, L): wanted, missed; kept for finish_step
        if not self._counts[1].any():
            return False
        missed = self.cache.missed()
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for layer, head, block in missed:
            by_layer.setdefault(layer, []).append((head, block))
        for layer, pairs in by_layer.items():
            self._fill(layer, pairs)
        self.cache.sync()
        return True

    def finish_step(self) -> None:
        """Meter the cache hits of a step that read in place (its misses were metered as filled)."""
        counts, self._counts = self._counts, None
        wanted = (counts if counts is not None else self.cache.step_counts())[0]
        for layer in range(self.layout.num_layers):
            hits = max(int(wanted[layer]) - int(self._filled[layer]), 0)
            if hits:
                self.meter.record("disk", layer, Counters(cache_hits=hits))

    def _fill(self, layer: int, pairs: list[tuple[int, int]], transient: bool = False) -> None:
        """Read blocks ``(head, block)`` into cache slots (evicting blocks of earlier steps): from the
        store, straight into the slots, or, past its whole chunks, from the rows in memory.
        ``transient``: read for an eager step (see :meth:`BlockPool.commit`)."""
        if self._writes:
            self._wait_for_writes()
        pool = self.cache
        stored = self._flushed_chunks[layer] * self.chunk_tokens // self.block_tokens
        slots = pool.alloc(len(pairs))
        disk_before, bytes_before = process_disk_read_bytes(), self.store.ledger.bytes_read
        try:
            on_disk = [i for i, (_, blk) in enumerate(pairs) if blk < stored]
            self._read_into(layer, [pairs[i] for i in on_disk], [pool.raw_slot(slots[i]) for i in on_disk])
            in_memory = [i for i, (_, blk) in enumerate(pairs) if blk >= stored]
            for i in in_memory:
                self._memory_block(layer, *pairs[i], pool.raw_slot(slots[i]))
        except BaseException:
            pool.release(slots)
            raise
        pool.commit(layer, pairs, slots, transient)
        self._filled[layer] += len(pairs)
        disk_after = process_disk_read_bytes()
        disk_read = 0 if disk_before is None or disk_after is None else disk_after - disk_before
        if on_disk:
            self.meter.record("disk", layer, Counters(physical=self.store.ledger.bytes_read - bytes_before, disk_read=disk_read,
                                                      cache_misses=len(on_disk)))
        if in_memory:
            self.meter.record("cpu", layer, Counters(physical=len(in_memory) * self._block_bytes, cache_misses=len(in_memory)))

    @property
    def checksums(self) -> dict[str, str]:
        """Checksum of every object written to the store, by key (for an artifact's manifest)."""
        self._wait_for_writes()
        return dict(self.store.ledger.checksums)

    def abandon(self) -> None:
        """Stop writing a store that is about to be removed (a failed or interrupted prefill):
        queued writes are dropped and running ones end before this returns, so that no writer
        thread recreates files in a folder being removed; their errors are not raised."""
        self._writes = []
        self._release(cancel=True)

    def close(self) -> None:
        try:
            self._wait_for_writes()
        finally:
            self._release()

    def _release(self, cancel: bool = False) -> None:
        if self._files is not None:
            self._files.close(cancel=cancel)
        self.cache.clear()
        self.store.close()

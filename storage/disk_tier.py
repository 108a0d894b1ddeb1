"""The disk tier: mid-region rows in a Zarr v3 store, read in blocks through a bounded cache.

Layout (one store per sequence; ``bench/scripts/disk_layout.py`` and ``bench/scripts/disk_decode.py`` hold the
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

from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.storage import FsspecStore, LocalStore

from .block_pool import BlockPool
from .chunk_files import ChunkFiles
from .checked_store import CheckedStore, Ledger
from .checksums import CorruptChunkError
from .device_checksums import DeviceChecksums
from .disk_reads import DiskReads
from .disk_writes import DiskWrites, WriteStats
from .errors import ArtifactError
from .kv_metadata import FORMAT, checked_metadata
from .defaults import DEFAULT_BLOCK_TOKENS, DEFAULT_CACHE_BYTES, DEFAULT_CHUNK_BLOCKS, POSITION_CHUNK
from .meter import ByteMeter
from .object_store import SCHEME, filesystem, is_remote
from .pending_rows import PendingRows, Piece
from .rows import dtype_name, raw_numpy_dtype
from .tier import TierLayout

VERSION = 2
# Chunk files named ``L{layer}/c.{head group}.{chunk}.0.0``: one folder per layer, not two per chunk
# (zarr's default "/" separator made 2,048 folders of a 32K-token 8B-shaped store, each created and
# flushed at the commit).  Stores keep their encoding in their metadata; older ones still open.
CHUNK_KEYS = {"name": "default", "separator": "."}


def open_store(location: str | Path, read_only: bool):  # noqa: ANN201 (a zarr Store)
    """A local folder (the default) or any fsspec URL, e.g. ``memory://kv`` or ``s3://bucket/kv``."""
    loc = str(location)
    if is_remote(loc):  # our s3fs file system: its deadlines and bounded retries (object_store.py)
        return FsspecStore(filesystem(asynchronous=True), read_only=read_only, path=loc.removeprefix(SCHEME))
    if "://" in loc and not loc.startswith("file://"):
        return FsspecStore.from_url(loc, read_only=read_only)
    return LocalStore(loc.removeprefix("file://"), read_only=read_only)


class DiskTier(DiskWrites, DiskReads):
    """A KV tier in a Zarr v3 store; its writes and reads are in disk_writes.py and disk_reads.py."""

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
        # A store at an s3:// URL: its reads are metered as network bytes and GETs too.
        self.remote = "s3" in (getattr(getattr(inner, "fs", None), "protocol", None) or ())
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

    def num_rows(self, layer: int) -> int:
        return self._flushed_chunks[layer] * self.chunk_tokens + self._pending[layer].rows

    def positions(self, layer: int) -> np.ndarray:
        parts = self._positions[layer]
        if len(parts) != 1:
            self._positions[layer] = parts = [np.concatenate(parts) if parts else np.zeros(0, np.int64)]
        return parts[0]

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

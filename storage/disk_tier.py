"""The disk tier: mid-region rows in a Zarr v3 store, read in whole blocks through a bounded cache.

Layout (one store per sequence; see ``bench/disk_layout.py`` for the measurements behind it):

- root group attributes: format, version, layout (layers, KV heads, head dim, dtype), block size;
- ``L{layer}``: ``(Hkv, rows, 2, d)`` raw bits of the model's dtype, uncompressed, one chunk per
  (KV head, block of ``block_tokens`` neighbouring tokens); attribute ``rows``;
- ``P{layer}``: ``(rows,)`` int64 token positions.

A gather reads every block of the layer that holds a requested row and is not cached, all at once
(concurrent reads on a small thread pool: one ``read`` per chunk file of a local store, zarr's
concurrent gets otherwise), verifies each against its checksum (:mod:`.checked_store`), keeps it in
an LRU cache bounded in bytes, and copies out the rows asked for.  A selector whose units are the
store's blocks (``BlockSelector`` with ``block == block_tokens``) reads exactly what it asks for.

Appended rows wait in host memory until they fill a block, which is then written: to a local store
on background threads (chunk files written directly, each once, so that writes overlap the caller's
compute; :meth:`flush` waits for them and writes the array metadata), elsewhere through zarr.  Only
a writable store is written; a committed artifact is never modified, so rows appended to a reopened
store stay in memory and are metered as tier ``cpu``.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from .block_cache import BlockCache
from .checked_store import CheckedStore, Ledger
from .checksums import crc32c_hex
from .defaults import DEFAULT_BLOCK_TOKENS, DEFAULT_CACHE_BYTES
from .meter import ByteMeter, Counters, process_disk_read_bytes
from .rows import DTYPES_BY_NAME, dtype_name, from_raw_numpy, pack, raw_numpy_dtype, to_raw_numpy
from .tier import TierLayout, check_append

FORMAT = "rcengine-kv"
VERSION = 1
# Threads that read and write chunk files (reads and writes release the GIL).
IO_THREADS = 8
# A gather reads the blocks it misses in concurrent batches of at most this many bytes.
READ_BATCH_BYTES = 64 << 20


def open_store(location: str | Path, read_only: bool):  # noqa: ANN201 (a zarr Store)
    """A local folder (the default) or any fsspec URL, e.g. ``memory://kv`` or ``s3://bucket/kv``."""
    loc = str(location)
    if "://" in loc and not loc.startswith("file://"):
        return FsspecStore.from_url(loc, read_only=read_only)
    return LocalStore(loc.removeprefix("file://"), read_only=read_only)


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
    ) -> None:
        self.store = store
        self.layout = layout
        self.block_tokens = block_tokens
        self.cache = BlockCache(cache_bytes)
        self.compute_device = torch.device(compute_device)
        self.meter = meter if meter is not None else ByteMeter()
        self.read_only = read_only
        self._raw = raw_numpy_dtype(layout.dtype)
        self._group = zarr.open_group(store, mode="r" if read_only else "r+")
        # Every block is written, zeros too, so that every stored block has a checksum.
        self._arrays = [self._group[f"L{i}"].with_config({"write_empty_chunks": True}) for i in range(layout.num_layers)]
        self._pos_arrays = [self._group[f"P{i}"] for i in range(layout.num_layers)]
        d, h = layout.head_dim, layout.num_kv_heads
        self._flushed_blocks = [0] * layout.num_layers  # whole blocks held by the store
        self._pending = [np.zeros((h, 0, 2, d), self._raw) for _ in range(layout.num_layers)]
        self._positions: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(layout.num_layers)]
        self._positions_written = [0] * layout.num_layers
        inner = store._store
        self._root = Path(inner.root) if isinstance(inner, LocalStore) else None  # chunk files read and written directly
        self._io: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []
        self._dirs: set[Path] = set()
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
    ) -> "DiskTier":
        """A new, empty store at ``location`` (refused if one exists there, unless ``overwrite``)."""
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        store = CheckedStore(open_store(location, read_only=False), Ledger(location=str(location)))
        attrs = {
            "format": FORMAT, "version": VERSION, "num_layers": layout.num_layers,
            "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
            "dtype": dtype_name(layout.dtype), "block_tokens": block_tokens,
        }
        try:
            group = zarr.create_group(store, attributes=attrs, overwrite=overwrite)
        except zarr.errors.ContainsGroupError as e:
            raise FileExistsError(f"a store already exists at {location}: choose another location or overwrite it") from e
        raw = raw_numpy_dtype(layout.dtype)
        for layer in range(layout.num_layers):
            group.create_array(
                f"L{layer}", shape=(layout.num_kv_heads, 0, 2, layout.head_dim), dtype=raw,
                chunks=(1, block_tokens, 2, layout.head_dim), compressors=None, fill_value=0,
                attributes={"rows": 0},
            )
            group.create_array(f"P{layer}", shape=(0,), dtype=np.int64, chunks=(65536,), compressors=None, fill_value=0)
        return cls(store, layout, block_tokens, cache_bytes, compute_device, meter, read_only=False)

    @classmethod
    def open(
        cls,
        location: str | Path,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        compute_device: torch.device | str = "cpu",
        meter: ByteMeter | None = None,
        checksums: dict[str, str] | None = None,
    ) -> "DiskTier":
        """Reopen a store read-only.  With ``checksums`` (from an artifact's manifest) every object
        read must match its checksum; without, nothing can be verified."""
        ledger = Ledger(checksums=dict(checksums or {}), strict=checksums is not None, location=str(location))
        store = CheckedStore(open_store(location, read_only=True), ledger)
        try:
            attrs = zarr.open_group(store, mode="r").attrs.asdict()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no KV store at {location}") from e
        if attrs.get("format") != FORMAT:
            raise ValueError(f"{location} is not an rcengine KV store (format {attrs.get('format')!r})")
        if attrs.get("version") != VERSION:
            raise ValueError(f"KV store {location} has format version {attrs.get('version')}, this rcengine reads {VERSION}")
        layout = TierLayout(attrs["num_layers"], attrs["num_kv_heads"], attrs["head_dim"], DTYPES_BY_NAME[attrs["dtype"]])
        return cls(store, layout, attrs["block_tokens"], cache_bytes, compute_device, meter, read_only=True)

    def _load_tail(self, layer: int, rows: int) -> None:
        """On open: whole blocks stay in the store; the last, partial block is read into memory."""
        b = self.block_tokens
        full = rows // b
        self._flushed_blocks[layer] = full
        if rows > full * b:
            self._pending[layer] = np.ascontiguousarray(self._arrays[layer][:, full * b : rows])
        self._positions[layer] = np.asarray(self._pos_arrays[layer][:rows], dtype=np.int64)
        self._positions_written[layer] = rows

    # -- writing ------------------------------------------------------------------------------

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        check_append(self.layout, layer, keys, values, positions)
        self._pending[layer] = np.concatenate([self._pending[layer], to_raw_numpy(pack(keys, values))], axis=1)
        self._positions[layer] = np.concatenate([self._positions[layer], positions.detach().cpu().numpy().astype(np.int64)])
        if not self.read_only:
            self._write_full_blocks(layer)

    def _pool(self) -> ThreadPoolExecutor:
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="rcengine-disk")
        return self._io

    def _write_full_blocks(self, layer: int) -> None:
        b = self.block_tokens
        full = self._pending[layer].shape[1] // b
        if full == 0:
            return
        start = self._flushed_blocks[layer] * b
        stop = start + full * b
        rows, self._pending[layer] = self._pending[layer][:, : full * b], np.ascontiguousarray(self._pending[layer][:, full * b :])
        first = start // b
        for block in range(first, first + full):
            for head in range(self.layout.num_kv_heads):
                self.cache.discard((layer, head, block))
        if self._root is not None:  # background writes, straight to the chunk files
            self._writes.append(self._pool().submit(self._write_blocks, layer, first, rows))
        else:
            arr = self._arrays[layer]
            if arr.shape[1] < stop:
                arr.resize((arr.shape[0], stop, *arr.shape[2:]))
            arr[:, start:stop] = rows
        self._flushed_blocks[layer] += full

    def _write_blocks(self, layer: int, first: int, rows: np.ndarray) -> None:
        """Write whole blocks ``rows: (Hkv, blocks b, 2, d)`` from block ``first`` on as chunk files
        (what zarr writes for an uncompressed chunk: its raw little-endian bytes), checksummed."""
        b = self.block_tokens
        for j in range(rows.shape[1] // b):
            for head in range(rows.shape[0]):
                self._write_chunk(self._chunk_key(layer, head, first + j), rows[head, j * b : (j + 1) * b].tobytes())

    def _write_chunk(self, key: str, data: bytes) -> None:
        path = self._root / key
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        with open(path, "wb") as f:
            f.write(data)
        self.store.ledger.checksums[key] = crc32c_hex(data)

    def _wait_for_writes(self) -> None:
        writes, self._writes = self._writes, []
        for w in writes:
            w.result()  # re-raises a failed write here

    def flush(self) -> None:
        """Write everything appended so far, the last partial blocks and the positions included, so
        that the store reopens with every row.  The partial blocks stay in memory too, so further
        appends can complete them."""
        if self.read_only:
            raise PermissionError("this KV store was opened read-only; rows appended to it stay in memory")
        self._wait_for_writes()
        b = self.block_tokens
        for layer, arr in enumerate(self._arrays):
            start = self._flushed_blocks[layer] * b
            rows = start + self._pending[layer].shape[1]
            if arr.shape[1] != rows:
                arr.resize((arr.shape[0], rows, *arr.shape[2:]))
            if rows > start:
                arr[:, start:rows] = self._pending[layer]
            if int(arr.attrs.get("rows", -1)) != rows:
                arr.attrs["rows"] = rows
            pos = self._pos_arrays[layer]
            written = self._positions_written[layer]
            if pos.shape[0] != rows:
                pos.resize((rows,))
            if rows > written:
                pos[written:rows] = self._positions[layer][written:rows]
            self._positions_written[layer] = rows

    # -- reading ------------------------------------------------------------------------------

    def num_rows(self, layer: int) -> int:
        return self._flushed_blocks[layer] * self.block_tokens + self._pending[layer].shape[1]

    def positions(self, layer: int) -> np.ndarray:
        return self._positions[layer]

    def _chunk_key(self, layer: int, head: int, block: int) -> str:
        arr = self._arrays[layer]
        return f"{arr.path}/{arr.metadata.encode_chunk_key((head, block, 0, 0))}"

    def _read_blocks(self, layer: int, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """Read whole blocks ``(head, block)``, concurrently; each is verified against its checksum.

        A local store's chunk files are read directly (one ``read`` each: ~10x less overhead per
        chunk than zarr's async store on 2 cores, see bench/RESULTS.md); other stores through
        zarr's concurrent gets."""
        if not wanted:
            return {}
        keys = [self._chunk_key(layer, h, b) for h, b in wanted]
        if self._root is not None:
            datas = list(self._pool().map(self._read_local, keys)) if len(keys) > 1 else [self._read_local(keys[0])]
            ledger = self.store.ledger
            for data in datas:
                if data is not None:
                    ledger.bytes_read += len(data)
                    ledger.objects_read += 1
        else:
            proto = default_buffer_prototype()

            async def fetch() -> list:
                return await asyncio.gather(*(self.store.get(k, proto) for k in keys))

            datas = [None if buf is None else buf.to_bytes() for buf in sync(fetch())]
        shape = (self.block_tokens, 2, self.layout.head_dim)
        out = {}
        for hb, data, key in zip(wanted, datas, keys, strict=True):
            if data is None:
                raise FileNotFoundError(f"chunk {key!r} is missing from the KV store {self.store.ledger.location}")
            out[hb] = np.frombuffer(data, dtype=self._raw).reshape(shape)
        return out

    def _read_local(self, key: str) -> bytes | None:
        """One chunk file, verified (thread-safe: the caller counts the bytes)."""
        try:
            fd = os.open(self._root / key, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size)  # one exact-size buffer (a larger one would be kept allocated)
            while len(data) < size:  # short reads happen on some file systems
                more = os.read(fd, size - len(data))
                if not more:
                    break
                data += more
        finally:
            os.close(fd)
        self.store.ledger.verify(key, data)
        return data

    def gather(self, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids: (Hkv, K)`` int64 row ids -> keys, values ``(Hkv, K, d)`` on the compute device.

        The blocks needed and not cached are read concurrently, several heads' at a time."""
        lay, b = self.layout, self.block_tokens
        if self._writes:
            self._wait_for_writes()
        ids_np = ids.detach().cpu().numpy().astype(np.int64, copy=False)
        h, k = ids_np.shape
        n = self.num_rows(layer)
        if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= n):
            raise IndexError(f"row ids must lie in 0..{n - 1} for layer {layer}, got {ids_np.min()}..{ids_np.max()}")
        stored = self._flushed_blocks[layer] * b
        out = np.empty((h, k, 2, lay.head_dim), self._raw)
        disk_before, bytes_before = process_disk_read_bytes(), self.store.ledger.bytes_read
        in_store = ids_np < stored
        block_bytes = b * lay.row_bytes
        hits = misses = 0
        # Head by head, each head's rows copied out of a stack of its blocks in one indexing; the
        # misses of several heads are read in one concurrent batch of at most READ_BATCH_BYTES, so
        # that a gather holds at most that much beyond the cache and its output.
        plans = []
        for head in range(h):
            idh = ids_np[head][in_store[head]]
            blocks, where = np.unique(idh // b, return_inverse=True)
            found = [self.cache.get((layer, head, blk)) for blk in blocks.tolist()]
            missing = [(head, blk) for blk, arr in zip(blocks.tolist(), found, strict=True) if arr is None]
            plans.append((blocks, where, found, missing))
        batch: list[int] = []
        for head in range(h + 1):
            if batch and (head == h or sum(len(plans[x][3]) for x in batch) * block_bytes + len(plans[head][3]) * block_bytes
                          > READ_BATCH_BYTES):
                fresh = self._read_blocks(layer, [hb for x in batch for hb in plans[x][3]])
                for x in batch:
                    blocks, where, found, missing = plans[x]
                    for i, blk in enumerate(blocks.tolist()):
                        if found[i] is None:
                            found[i] = fresh[x, blk]
                            self.cache.put((layer, x, blk), found[i])
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
            out[rest] = self._pending[layer][heads[rest], ids_np[rest] - stored]
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

    @property
    def checksums(self) -> dict[str, str]:
        """Checksum of every object written to the store, by key (for an artifact's manifest)."""
        self._wait_for_writes()
        return dict(self.store.ledger.checksums)

    def close(self) -> None:
        try:
            self._wait_for_writes()
        finally:
            if self._io is not None:
                self._io.shutdown(wait=True)
                self._io = None
            self.cache.clear()
            self.store.close()

"""The disk tier: mid-region rows in a Zarr v3 store, read in whole blocks through a bounded cache.

Layout (one store per sequence; see ``bench/disk_layout.py`` for the measurements behind it):

- root group attributes: format, version, layout (layers, KV heads, head dim, dtype), block size;
- ``L{layer}``: ``(Hkv, rows, 2, d)`` raw bits of the model's dtype, uncompressed, one chunk per
  (KV head, block of ``block_tokens`` neighbouring tokens); attribute ``rows``;
- ``P{layer}``: ``(rows,)`` int64 token positions.

A gather reads every block that holds a requested row and is not cached, all at once (concurrent
store reads), verifies each against its checksum (:mod:`.checked_store`), keeps it in an LRU cache
bounded in bytes, and copies out the rows asked for.  Appended rows wait in host memory until they
fill a block, which is then written (only when the store is writable; a committed artifact is never
modified, so rows appended to a reopened store stay in memory and are metered as tier ``cpu``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from .block_cache import BlockCache
from .checked_store import CheckedStore, Ledger
from .defaults import DEFAULT_BLOCK_TOKENS, DEFAULT_CACHE_BYTES
from .meter import ByteMeter, Counters, process_disk_read_bytes
from .rows import DTYPES_BY_NAME, dtype_name, from_raw_numpy, pack, raw_numpy_dtype, to_raw_numpy
from .tier import TierLayout, check_append

FORMAT = "rcengine-kv"
VERSION = 1


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

    def _write_full_blocks(self, layer: int) -> None:
        b = self.block_tokens
        full = self._pending[layer].shape[1] // b
        if full == 0:
            return
        arr = self._arrays[layer]
        start = self._flushed_blocks[layer] * b
        stop = start + full * b
        if arr.shape[1] < stop:
            arr.resize((arr.shape[0], stop, *arr.shape[2:]))
        arr[:, start:stop] = self._pending[layer][:, : full * b]
        self._pending[layer] = np.ascontiguousarray(self._pending[layer][:, full * b :])
        for block in range(start // b, stop // b):
            for head in range(self.layout.num_kv_heads):
                self.cache.discard((layer, head, block))
        self._flushed_blocks[layer] += full
        arr.attrs["rows"] = max(int(arr.attrs.get("rows", 0)), stop)

    def flush(self) -> None:
        """Write everything appended so far, the last partial blocks and the positions included, so
        that the store reopens with every row.  The partial blocks stay in memory too, so further
        appends can complete them."""
        if self.read_only:
            raise PermissionError("this KV store was opened read-only; rows appended to it stay in memory")
        b = self.block_tokens
        for layer, arr in enumerate(self._arrays):
            start = self._flushed_blocks[layer] * b
            rows = start + self._pending[layer].shape[1]
            if arr.shape[1] != rows:
                arr.resize((arr.shape[0], rows, *arr.shape[2:]))
            if rows > start:
                arr[:, start:rows] = self._pending[layer]
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
        """Read whole blocks ``(head, block)``; each is verified against its checksum.

        A local store's chunk files are read directly (one ``read`` each: ~10x less overhead per
        chunk than zarr's async store on 2 cores, see bench/RESULTS.md); other stores through
        zarr, concurrently."""
        if not wanted:
            return {}
        keys = [self._chunk_key(layer, h, b) for h, b in wanted]
        inner = self.store._store
        if isinstance(inner, LocalStore):
            datas = [self._read_local(Path(inner.root), key) for key in keys]
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

    def _read_local(self, root: Path, key: str) -> bytes | None:
        ledger = self.store.ledger
        try:
            fd = os.open(root / key, os.O_RDONLY)
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
        ledger.verify(key, data)
        ledger.bytes_read += len(data)
        ledger.objects_read += 1
        return data

    def gather(self, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids: (Hkv, K)`` int64 row ids -> keys, values ``(Hkv, K, d)`` on the compute device."""
        lay, b = self.layout, self.block_tokens
        ids_np = ids.detach().cpu().numpy().astype(np.int64, copy=False)
        h, k = ids_np.shape
        n = self.num_rows(layer)
        if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= n):
            raise IndexError(f"row ids must lie in 0..{n - 1} for layer {layer}, got {ids_np.min()}..{ids_np.max()}")
        stored = self._flushed_blocks[layer] * b
        out = np.empty((h, k, 2, lay.head_dim), self._raw)
        store_rows = hits = misses = 0
        disk_before, bytes_before = process_disk_read_bytes(), self.store.ledger.bytes_read
        # Head by head, so that blocks read but not kept by the cache are let go at once: the
        # memory a gather holds beyond the cache is one head's blocks.
        for head in range(h):
            idh = ids_np[head]
            sel = np.nonzero(idh < stored)[0]
            blocks = np.unique(idh[sel] // b)
            have, wanted = {}, []
            for block in blocks.tolist():
                cached = self.cache.get((layer, head, block))
                if cached is None:
                    wanted.append((head, block))
                else:
                    have[block] = cached
            for (_, block), arr in self._read_blocks(layer, wanted).items():
                self.cache.put((layer, head, block), arr)
                have[block] = arr
            hits += len(blocks) - len(wanted)
            misses += len(wanted)
            store_rows += sel.size
            if sel.size:
                order = sel[np.argsort(idh[sel] // b, kind="stable")]
                starts = np.searchsorted(idh[order] // b, blocks)
                for block, lo, hi in zip(blocks.tolist(), starts.tolist(), [*starts[1:].tolist(), order.size], strict=True):
                    rows = order[lo:hi]
                    out[head, rows] = have[block][idh[rows] - block * b]
            rest = np.nonzero(idh >= stored)[0]
            if rest.size:
                out[head, rest] = self._pending[layer][head, idh[rest] - stored]
        disk_after = process_disk_read_bytes()

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
        return dict(self.store.ledger.checksums)

    def close(self) -> None:
        self.cache.clear()
        self.store.close()

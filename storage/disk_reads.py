"""The disk tier's reads (:class:`DiskReads`, a part of :class:`~.disk_tier.DiskTier`): blocks found
in the block cache with tensor operations (:meth:`resolve`), the missed ones read between a step's
runs (:meth:`fill_missed`), each verified against its checksum; gathers of rows for host readers.
See disk_tier.py for the whole."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .checksums import CorruptChunkError
from .meter import Counters, process_disk_read_bytes
from .object_store import remote_errors
from .rows import from_raw_numpy

# A gather reads the blocks it misses in concurrent batches of at most this many bytes.
READ_BATCH_BYTES = 64 << 20


class DiskReads:
    """Finding, reading and gathering blocks (a part of DiskTier: its state is set up by DiskTier.__init__)."""

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
            with remote_errors(self.store.ledger.location):
                fetched = sync(fetch())
            for buf, dest in zip(fetched, dests, strict=True):
                data = None if buf is None else buf.to_bytes()
                if data is not None and len(data) == size:
                    dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
                got.append(-1 if data is None else len(data))
        for n, (key, _) in zip(got, places, strict=True):
            if n != size:
                what = "is missing" if n < 0 else f"is truncated ({n} of {size} bytes of a block)"
                raise CorruptChunkError(f"chunk {key!r} of {self.store.ledger.location} {what}: "
                                        "re-create the store (rcengine prefill) or restore it from a copy")

    def _net(self, bytes_before: int, gets_before: int) -> dict[str, int]:
        """The network's share of what the store returned since the counts given (a remote store's)."""
        if not self.remote:
            return {}
        return {"net_bytes": self.store.ledger.bytes_read - bytes_before, "net_gets": self.store.ledger.objects_read - gets_before}

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
        disk_before, bytes_before, gets_before = process_disk_read_bytes(), self.store.ledger.bytes_read, self.store.ledger.objects_read
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
            rows=store_rows, gathers=1, **self._net(bytes_before, gets_before),
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
        disk_before, bytes_before, gets_before = process_disk_read_bytes(), self.store.ledger.bytes_read, self.store.ledger.objects_read
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
                                                      cache_misses=len(on_disk), **self._net(bytes_before, gets_before)))
        if in_memory:
            self.meter.record("cpu", layer, Counters(physical=len(in_memory) * self._block_bytes, cache_misses=len(in_memory)))

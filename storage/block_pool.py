"""The disk tier's block cache: resident blocks in slots the compute device reads in place, and a
table from (layer, KV head, block) to slot on the compute device.

A block is ``block_tokens`` neighbouring rows of one KV head, ``(block, 2, d)`` raw bits of the
model's dtype; a slot holds one.  The slots ``(capacity, block, 2, d)`` are host memory: pinned and
read zero-copy by a CUDA device where that is possible (:attr:`view`), plain memory on a CPU.  The
table ``(L, Hkv, blocks)`` int32 (slot, or -1) lives on the compute device, mirrored on the host.

Two ways in:

- the host (:meth:`get` / :meth:`put`): the tier's ``gather`` copies rows out of resident blocks
  and offers what it read;
- the device (:meth:`lookup`): a decode step looks its blocks up with tensor operations only (no
  host sync, so it runs inside a CUDA graph), reads hits in place, and flags what it touched and
  what it missed, per layer.  The host then fills the misses (:meth:`alloc`, :meth:`commit`),
  copies its table to the device once (:meth:`sync`), and the step runs again (see
  ``DiskTier.fill_missed``); an eager step fills a layer's misses at once.

Eviction is least recently used, by step: :meth:`tick` starts a step, every slot a step touches
carries its number (``stamps``, written on the device by lookups and on the host by get/put), and
only slots of earlier steps are evicted, so a block a step has read stays until the step is done.
"""

from __future__ import annotations

import math

import numpy as np
import psutil
import torch

from .host_memory import alloc_host, device_view, zero_copy_possible
from .rows import raw_numpy_dtype
from .tier import TierLayout


class BlockPoolFull(ValueError):
    """A step needs more blocks at once than the cache holds (a setting to raise: bad input)."""


class BlockPool:
    """See the module docstring.  ``capacity_bytes`` bounds the slots (0: nothing is kept)."""

    def __init__(self, layout: TierLayout, block_tokens: int, capacity_bytes: int, compute_device: torch.device | str) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.layout, self.block_tokens = layout, block_tokens
        self.compute_device = dev = torch.device(compute_device)
        self.capacity_bytes = capacity_bytes
        self.slot_bytes = block_tokens * layout.row_bytes
        self.capacity = capacity_bytes // self.slot_bytes
        available = psutil.virtual_memory().available
        if self.capacity * self.slot_bytes > available:
            raise BlockPoolFull(f"the block cache of {capacity_bytes >> 20} MiB (--cache-mb) is more than this machine's available "
                                f"memory ({available >> 20} MiB): choose a smaller --cache-mb")
        # The slots are allocated at first use (pinned memory is slow to allocate).
        self._slots: torch.Tensor | None = None
        self._raw: np.ndarray | None = None
        self._view: torch.Tensor | None = None
        h, layers = layout.num_kv_heads, layout.num_layers
        self._table = np.full((layers, h, 0), -1, np.int32)
        self.table = torch.full((layers, h, 0), -1, dtype=torch.int32, device=dev)
        self._dirty = False  # the host table has changes the device's lacks (see sync)
        self._owner = np.full((self.capacity, 3), -1, np.int64)  # (layer, head, block) of each slot
        self._free = list(range(self.capacity - 1, -1, -1))
        self._host_stamp = np.zeros(self.capacity, np.int64)
        self._transient = np.zeros(self.capacity, bool)
        self.stamps = torch.zeros(self.capacity + 1, dtype=torch.int64, device=dev)  # + a slot for misses to write to
        # flags[0]: blocks a step's lookups wanted; flags[1]: those it did not find.  (2, L, Hkv blocks + 1)
        self.flags = torch.zeros(2, layers, 1, dtype=torch.int32, device=dev)
        self.clock = 0
        self.clock_dev = torch.zeros((), dtype=torch.int64, device=dev)
        self.deferred = False  # lookups only record misses (a captured step); else the caller fills at once
        self.version = 0  # bumped when the table or the flags are reallocated
        self.peak_bytes = 0

    @property
    def device_readable(self) -> bool:
        """Whether the compute device reads the slots in place (a CPU, or CUDA with zero-copy)."""
        return self.capacity > 0 and (self.compute_device.type == "cpu" or zero_copy_possible(self.compute_device))

    def _allocate(self) -> None:
        lay = self.layout
        self._slots = alloc_host((self.capacity, self.block_tokens, 2, lay.head_dim), lay.dtype, self.compute_device)
        bits = torch.int32 if lay.dtype == torch.float32 else torch.int16
        self._raw = self._slots.view(bits).numpy().view(raw_numpy_dtype(lay.dtype))  # raw bits, shared with the slots

    @property
    def view(self) -> torch.Tensor:
        """``(capacity, block, 2, d)``: the slots as the compute device reads them (the slots on a CPU,
        their zero-copy view on CUDA); needs :attr:`device_readable`."""
        if self._view is None:
            if not self.device_readable:
                raise RuntimeError("the compute device cannot read the block cache in place")
            if self._slots is None:
                self._allocate()
            self._view = self._slots if self.compute_device.type == "cpu" else device_view(self._slots, self.compute_device)
        return self._view

    # -- sizes -------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of the slots in use."""
        return (self.capacity - len(self._free)) * self.slot_bytes

    @property
    def blocks(self) -> int:
        """Blocks per layer and head the table covers."""
        return self._table.shape[2]

    def reserve(self, rows: int) -> None:
        """A table that covers ``rows`` rows per layer (between steps: bumps ``version``)."""
        need = math.ceil(rows / self.block_tokens)
        if need <= self.blocks:
            return
        grown = np.full((*self._table.shape[:2], need), -1, np.int32)
        grown[:, :, : self.blocks] = self._table
        self._table = grown
        self.table = torch.from_numpy(grown.copy()).to(self.compute_device)
        self._dirty = False
        layers, h = self._table.shape[:2]
        self.flags = torch.zeros(2, layers, h * need + 1, dtype=torch.int32, device=self.compute_device)
        self.version += 1

    # -- steps -------------------------------------------------------------------------------

    def tick(self) -> None:
        """Start a step: slots it touches from now on are not evicted before the next tick."""
        self.clock += 1
        self.clock_dev.fill_(self.clock)

    def begin_step(self) -> None:
        """Clear the flags (on the device: part of a captured step)."""
        self.flags.zero_()

    def lookup(self, layer: int, blocks: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        """``blocks: (..., Hkv, X)`` block ids (any values where not ``wanted``) -> their slots, -1
        where not resident.  Flags the wanted blocks and the missing ones, and stamps the slots
        found with the step; tensor operations only."""
        h, nb = self._table.shape[1], self.blocks
        head = torch.arange(h, device=blocks.device)[:, None]
        flat = head * nb + blocks.clamp(0, max(nb - 1, 0))  # (..., Hkv, X)
        slot = self.table[layer].view(-1)[flat.view(-1)].view(flat.shape).to(torch.int64)
        hit = wanted & (slot >= 0)
        miss = wanted & (slot < 0)
        dummy = h * nb
        ones = torch.ones(flat.numel(), dtype=torch.int32, device=blocks.device)
        self.flags[0, layer].scatter_add_(0, torch.where(wanted, flat, dummy).view(-1), ones)
        self.flags[1, layer].scatter_add_(0, torch.where(miss, flat, dummy).view(-1), ones)
        self.stamps.scatter_(0, torch.where(hit, slot, self.capacity).view(-1), self.clock_dev.expand(flat.numel()))
        return torch.where(hit, slot, -1)

    def step_counts(self) -> np.ndarray:
        """``(2, L)``: blocks the last run of the step wanted, and missed, per layer (one host sync)."""
        return (self.flags[:, :, :-1] > 0).sum(-1).cpu().numpy()

    def missed(self) -> list[tuple[int, int, int]]:
        """The (layer, head, block) triples the last run of the step flagged as missing."""
        nb = self.blocks
        found = torch.nonzero(self.flags[1, :, :-1]).cpu().numpy()  # (n, 2): layer, head * nb + block
        return [(int(layer), int(hb // nb), int(hb % nb)) for layer, hb in found]

    # -- the host's side ---------------------------------------------------------------------

    def slot_of(self, layer: int, head: int, block: int) -> int:
        if block >= self.blocks:
            return -1
        return int(self._table[layer, head, block])

    def get(self, layer: int, head: int, block: int) -> np.ndarray | None:
        """A resident block's raw rows ``(block, 2, d)`` (a view of its slot; valid until the next
        tick), stamped with the step, or None."""
        slot = self.slot_of(layer, head, block)
        if slot < 0:
            return None
        self._host_stamp[slot] = self.clock
        return self.raw_slot(slot)

    def put(self, layer: int, head: int, block: int, rows: np.ndarray) -> bool:
        """Keep a copy of a block just read, if a slot is free or evictable; False if not kept."""
        slots = self.alloc(1, strict=False)
        if not slots:
            return False
        self.raw_slot(slots[0])[...] = rows
        self.commit(layer, [(head, block)], slots)
        return True

    def alloc(self, count: int, strict: bool = True) -> list[int]:
        """``count`` slots, free ones first, then those of the least recently used earlier steps
        (evicted).  ``strict``: raise :class:`BlockPoolFull` if there are not enough; otherwise
        return as many as there are."""
        if count > len(self._free):
            self._evict(count - len(self._free))
        if count > len(self._free):
            if strict:
                raise BlockPoolFull(
                    f"a step needs {count} more blocks of {self.slot_bytes} bytes at once than the disk tier's block cache "
                    f"of {self.capacity_bytes} bytes can hold: raise the cache size (--cache-mb, EngineConfig.cache_bytes)")
            count = len(self._free)
        return [self._free.pop() for _ in range(count)]

    def _evict(self, count: int) -> None:
        used = np.nonzero(self._owner[:, 0] >= 0)[0]
        if not used.size:
            return
        device = self.stamps[:-1].cpu().numpy()[used]
        stamp = np.maximum(self._host_stamp[used], device)
        older = stamp < self.clock
        if not older.any():
            return
        transient = self._transient[used] & (device <= self._host_stamp[used])  # not used since its eager step
        order = np.lexsort((stamp[older], ~transient[older]))[:count]  # transient first, then least recent
        self.release(used[older][order].tolist())

    def release(self, slots: list[int]) -> None:
        """Return slots to the free list (and drop their blocks from the table)."""
        if not slots:
            return
        owners = self._owner[slots]
        live = owners[:, 0] >= 0
        if live.any():
            layer, head, block = owners[live].T
            self._table[layer, head, block] = -1
            self._dirty = True
        self._owner[slots] = -1
        self._free.extend(slots)

    def commit(self, layer: int, blocks: list[tuple[int, int]], slots: list[int], transient: bool = False) -> None:
        """Blocks ``(head, block)`` now in ``slots`` (filled by the caller): into the table, stamped
        with the step.  ``transient`` blocks (read for an eager step, such as a question's batch of
        positions, which reads many blocks once, layer by layer) are evicted before any other, unless
        a later step has used them: a question does not flush the blocks its answer's steps reuse."""
        if not slots:
            return
        head = np.array([h for h, _ in blocks], np.int64)
        block = np.array([b for _, b in blocks], np.int64)
        if block.max() >= self.blocks:
            self.reserve((int(block.max()) + 1) * self.block_tokens)
        s = np.array(slots, np.int64)
        self._table[layer, head, block] = s
        self._owner[s] = np.stack([np.full_like(head, layer), head, block], axis=1)
        self._host_stamp[s] = self.clock
        self._transient[s] = transient
        self._dirty = True
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def raw_slot(self, slot: int) -> np.ndarray:
        """A slot's raw rows ``(block, 2, d)``, to fill in place."""
        if self._raw is None:
            self._allocate()
        return self._raw[slot]

    def discard_blocks(self, layer: int, first: int, stop: int) -> None:
        """Drop blocks ``first..stop-1`` of every head of ``layer`` (their rows changed)."""
        stop = min(stop, self.blocks)
        if first >= stop:
            return
        slots = self._table[layer, :, first:stop]
        self.release(slots[slots >= 0].tolist())

    def clear(self) -> None:
        self.release(np.nonzero(self._owner[:, 0] >= 0)[0].tolist())

    def sync(self) -> None:
        """Copy the host table to the device, if it changed (once per round of fills, between runs of
        a step: one copy instead of one per change)."""
        if self._dirty:
            self.table.copy_(torch.from_numpy(self._table), non_blocking=False)
            self._dirty = False

    def __len__(self) -> int:
        return self.capacity - len(self._free)

"""Selectors: which mid tokens a decode query retrieves, one small class each.

A selector holds the selection state of one layer's mid-region and, per step, chooses for each KV
head and query position ``count`` units (tokens, or whole blocks of ``block`` tokens), ranked by
the largest score any query head of the group gives them (the GQA group merge).

- ``exact`` (:class:`ExactSelector`): scores against a copy of every mid key on the compute
  device (the model's dtype, scored in float32): the oracle Top-K.
- ``exact-block`` (:class:`ExactSelector` with ``block > 1``): the same scores, and whole blocks
  of ``block`` tokens ranked by their best token's: on the disk tier, where a block is read
  whole, every row read is attended.
- ``block`` (:class:`BlockSelector`): per block of ``block`` neighbouring tokens, the per-channel
  max and min of its keys (Quest); a block's score is the upper bound ``sum_i max(q_i max_i,
  q_i min_i)`` of its tokens' scores, and whole blocks are retrieved.
- ``faiss`` (:class:`FaissSelector`): a FAISS index per KV head on the host (flat, IVF or HNSW);
  the CPU path, and the only one whose keys can stay out of memory (streamed from a store).

Shapes: ``qg: (T, Hkv, G, d)``; ``select`` returns ``ids, valid: (T, Hkv, count * block)`` on the
compute device, ids ascending within a block and blocks best first.  Device selectors use only
static shapes and device scalars (``n_mid``, ``live``: 0-dim int64 tensors), so a step that uses
them can be captured in a CUDA graph; capacity grows only in :meth:`reserve`, between steps, and
bumps ``version``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from . import kernels
from .top import top_units

if TYPE_CHECKING:
    from ...storage import KeyIndex


@runtime_checkable
class Selector(Protocol):
    name: str
    on_device: bool  # selects on the compute device without a host sync
    block: int  # tokens per selected unit
    version: int  # changes when a buffer a captured step reads is reallocated

    def add(self, keys: torch.Tensor) -> None:
        """Rows appended to the mid-region, in order: ``keys: (Hkv, n, d)``."""
        ...

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` mid rows without reallocating."""
        ...

    def select(self, qg: torch.Tensor, cap: int, count: int, live: torch.Tensor | int,
               n_mid: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` best units over the first ``cap`` rows (rows ``>= n_mid`` never chosen
        ahead of a real one), as token ids; units ranked ``>= live`` and rows ``>= n_mid`` are
        returned but marked invalid."""
        ...

    def state_bytes(self) -> int:
        """Memory the selection state holds (compute device, or host for faiss)."""
        ...

    def read_bytes(self, cap: int) -> int:
        """Bytes one selection call reads over ``cap`` rows (all KV heads; any number of queries)."""
        ...


def scores_fp32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x: (H, M, d) @ y: (H, d, N)`` in float32 from operands in any float dtype: on CUDA, half
    types are multiplied as they are with float32 output; elsewhere they are upcast first."""
    if x.dtype != torch.float32 and x.is_cuda:
        try:
            return torch.bmm(x.to(y.dtype), y, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return torch.bmm(x.float(), y.float())


def _grouped(qg: torch.Tensor) -> torch.Tensor:
    """``(T, Hkv, G, d) -> (Hkv, T G, d)``."""
    t, h, g, d = qg.shape
    return qg.transpose(0, 1).reshape(h, t * g, d)


def _group_max(s: torch.Tensor, t: int) -> torch.Tensor:
    """``(Hkv, T G, N)`` scores -> ``(T, Hkv, N)``: the best query of each group."""
    h, tg, n = s.shape
    return s.view(h, t, tg // t, n).amax(dim=2).transpose(0, 1)


def expand_units(units: torch.Tensor, block: int, live: torch.Tensor | int, n_mid: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen units ``(T, Hkv, count)`` of ``block`` tokens, best first -> their token ids ``(T,
    Hkv, count block)`` and which count: units ranked below ``live``, rows below ``n_mid``."""
    count = units.shape[-1]
    ok = torch.arange(count, device=units.device) < live  # (count,)
    if block == 1:
        return units, ok & (units < n_mid)
    ids = (units[..., None] * block + torch.arange(block, device=units.device)).flatten(-2)
    return ids, ok.repeat_interleave(block) & (ids < n_mid)


def unit_blocks(units: torch.Tensor, unit: int, block: int, live: torch.Tensor | int,
                n_mid: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen units ``(T, Hkv, count)`` of ``unit`` tokens -> the ids of the tier's blocks of
    ``block`` tokens they cover ``(T, Hkv, X)`` (a block may repeat), and which are wanted: units
    ranked below ``live`` with rows below ``n_mid``."""
    count = units.shape[-1]
    ok = torch.arange(count, device=units.device) < live  # (count,)
    if unit % block == 0:  # whole blocks
        per = unit // block
        blocks = (units[..., None] * per + torch.arange(per, device=units.device)).flatten(-2)
        return blocks, ok.repeat_interleave(per) & (blocks * block < n_mid)
    tokens = (units[..., None] * unit + torch.arange(unit, device=units.device)).flatten(-2)
    return tokens // block, ok.repeat_interleave(unit) & (tokens < n_mid)


def _grow(buf: torch.Tensor, used: int, rows: int) -> torch.Tensor:
    """A copy of ``buf: (H, cap, d)`` with room for exactly ``rows``."""
    new = buf.new_empty(buf.shape[0], rows, buf.shape[2])
    new[:, :used] = buf[:, :used]
    return new


def _room(capacity: int, needed: int) -> int:
    """Capacity for appends: at least 1.5x the old one, so that appending stays amortised O(1)."""
    return max(needed, math.ceil(1.5 * capacity))


class ExactSelector:
    """Every mid key on the compute device, ``keys: (Hkv, capacity, d)`` in the model's dtype.
    With ``block > 1`` it chooses whole blocks of ``block`` tokens by their best token's score."""

    on_device = True

    def __init__(self, heads: int, dim: int, dtype: torch.dtype, device: torch.device | str, capacity: int = 0,
                 block: int = 1) -> None:
        if block < 1:
            raise ValueError(f"a selection block holds at least 1 token, got {block}")
        self.keys = torch.empty(heads, capacity, dim, dtype=dtype, device=device)
        self.n = 0
        self.version = 0
        self.block = block
        self.name = "exact" if block == 1 else "exact-block"

    def reserve(self, rows: int) -> None:
        if rows > self.keys.shape[1]:
            self.keys = _grow(self.keys, self.n, rows)
            self.version += 1

    def add(self, keys: torch.Tensor) -> None:
        m = keys.shape[1]
        if self.n + m > self.keys.shape[1]:
            self.reserve(_room(self.keys.shape[1], self.n + m))
        self.keys[:, self.n : self.n + m] = keys.to(self.keys.device, self.keys.dtype)
        self.n += m

    def choose(self, qg: torch.Tensor, cap: int, count: int, n_mid: torch.Tensor | int) -> torch.Tensor:
        """Unit ids ``(T, Hkv, count)`` of the best keys (or blocks, by their best key) among the
        first ``cap`` rows, best first."""
        if kernels.available(qg.device) and torch.is_tensor(n_mid):
            s = kernels.selection_scores(qg, self.keys, cap, n_mid)  # (T, Hkv, cap), one read of the keys
        else:
            s = _group_max(scores_fp32(_grouped(qg), self.keys[:, :cap].transpose(1, 2)), qg.shape[0])
            s = s.masked_fill(torch.arange(cap, device=s.device) >= n_mid, -math.inf)
        b = self.block
        if b > 1:  # a block's score is its best token's (rows past n_mid score -inf)
            blocks = math.ceil(cap / b)
            s = torch.nn.functional.pad(s, (0, blocks * b - cap), value=-math.inf).view(*s.shape[:2], blocks, b).amax(dim=-1)
        return top_units(s, count)

    def select(self, qg: torch.Tensor, cap: int, count: int, live: torch.Tensor | int,
               n_mid: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        return expand_units(self.choose(qg, cap, count, n_mid), self.block, live, n_mid)

    def state_bytes(self) -> int:
        return self.keys.numel() * self.keys.element_size()

    def read_bytes(self, cap: int) -> int:
        return self.keys.shape[0] * cap * self.keys.shape[2] * self.keys.element_size()


class BlockSelector:
    """Per block of ``block`` tokens and KV head, the channel-wise max and min of its keys:
    ``kmax, kmin: (Hkv, blocks capacity, d)`` in the model's dtype (a partly filled last block
    holds the bounds of the rows it has)."""

    name = "block"
    on_device = True

    def __init__(self, heads: int, dim: int, dtype: torch.dtype, device: torch.device | str, block: int,
                 capacity: int = 0) -> None:
        if block < 1:
            raise ValueError(f"a selection block holds at least 1 token, got {block}")
        self.block = block
        blocks = math.ceil(capacity / block)
        self.kmax = torch.empty(heads, blocks, dim, dtype=dtype, device=device)
        self.kmin = torch.empty_like(self.kmax)
        self.n = 0
        self.version = 0

    def reserve(self, rows: int) -> None:
        blocks = math.ceil(rows / self.block)
        if blocks > self.kmax.shape[1]:
            used = math.ceil(self.n / self.block)
            self.kmax, self.kmin = _grow(self.kmax, used, blocks), _grow(self.kmin, used, blocks)
            self.version += 1

    def add(self, keys: torch.Tensor) -> None:
        h, m, d = keys.shape
        if m == 0:
            return
        b = self.block
        if self.n + m > self.kmax.shape[1] * b:
            self.reserve(_room(self.kmax.shape[1] * b, self.n + m))
        keys = keys.to(self.kmax.device, self.kmax.dtype)
        first, front = divmod(self.n, b)  # first block touched; rows it already holds
        blocks = math.ceil((front + m) / b)
        back = blocks * b - front - m
        if front == 0 and back == 0:  # whole blocks (a prefill's or a store's chunks): no padded copy
            hi = keys.reshape(h, blocks, b, d).amax(dim=2)
            lo = keys.reshape(h, blocks, b, d).amin(dim=2)
        else:
            pad = lambda fill, rows: keys.new_full((h, rows, d), fill)  # noqa: E731
            hi = torch.cat([pad(-math.inf, front), keys, pad(-math.inf, back)], dim=1).view(h, blocks, b, d).amax(dim=2)
            lo = torch.cat([pad(math.inf, front), keys, pad(math.inf, back)], dim=1).view(h, blocks, b, d).amin(dim=2)
        if front:  # fold in the bounds of the rows the first block already holds
            hi[:, 0] = torch.maximum(hi[:, 0], self.kmax[:, first])
            lo[:, 0] = torch.minimum(lo[:, 0], self.kmin[:, first])
        self.kmax[:, first : first + blocks] = hi
        self.kmin[:, first : first + blocks] = lo
        self.n += m

    def saved(self) -> dict[str, torch.Tensor]:
        """The bounds of the blocks filled so far, ``kmax, kmin: (Hkv, blocks, d)`` (to persist)."""
        used = math.ceil(self.n / self.block)
        return {"kmax": self.kmax[:, :used], "kmin": self.kmin[:, :used]}

    def load(self, kmax: torch.Tensor, kmin: torch.Tensor, rows: int) -> None:
        """Bounds saved by :meth:`saved` of ``rows`` mid rows, in place of adding their keys."""
        if kmax.shape != kmin.shape or kmax.shape[1] != math.ceil(rows / self.block) or self.n:
            raise ValueError(f"saved bounds {tuple(kmax.shape)} do not cover {rows} rows in blocks of {self.block}")
        self.reserve(rows)
        self.kmax[:, : kmax.shape[1]] = kmax.to(self.kmax.device, self.kmax.dtype)
        self.kmin[:, : kmin.shape[1]] = kmin.to(self.kmin.device, self.kmin.dtype)
        self.n = rows

    def choose(self, qg: torch.Tensor, cap: int, count: int, n_mid: torch.Tensor | int) -> torch.Tensor:
        """Block ids ``(T, Hkv, count)`` of the best blocks over the first ``cap`` rows, best first."""
        t, b = qg.shape[0], self.block
        blocks = math.ceil(cap / b)
        if kernels.available(qg.device) and torch.is_tensor(n_mid):
            s = kernels.selection_scores(qg, self.kmax, blocks, n_mid, b, self.kmin)  # (T, Hkv, blocks)
            return top_units(s, count)
        q = _grouped(qg).float()
        # Upper bound of q.k over a block: sum_i max(q_i hi_i, q_i lo_i) = q+ . hi + q- . lo
        s = scores_fp32(q.clamp_min(0), self.kmax[:, :blocks].transpose(1, 2)) + \
            scores_fp32(q.clamp_max(0), self.kmin[:, :blocks].transpose(1, 2))
        s = _group_max(s, t)  # (T, Hkv, blocks)
        s = s.masked_fill(torch.arange(blocks, device=s.device) * b >= n_mid, -math.inf)
        return s.topk(count, dim=-1).indices

    def select(self, qg: torch.Tensor, cap: int, count: int, live: torch.Tensor | int,
               n_mid: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        return expand_units(self.choose(qg, cap, count, n_mid), self.block, live, n_mid)

    def state_bytes(self) -> int:
        return 2 * self.kmax.numel() * self.kmax.element_size()

    def read_bytes(self, cap: int) -> int:
        h, _, d = self.kmax.shape
        return 2 * h * math.ceil(cap / self.block) * d * self.kmax.element_size()


class FaissSelector:
    """One layer of a :class:`~rcengine.storage.KeyIndex` (a FAISS index per KV head, searched on
    the host); it meters what it reads itself."""

    name = "faiss"
    on_device = False
    block = 1
    version = 0

    def __init__(self, index: KeyIndex, layer: int, device: torch.device | str) -> None:
        self.index, self.layer, self.device = index, layer, torch.device(device)

    def reserve(self, rows: int) -> None:
        pass  # FAISS grows its own storage

    def add(self, keys: torch.Tensor) -> None:
        self.index.add(self.layer, keys)

    def select(self, qg: torch.Tensor, cap: int, count: int, live: torch.Tensor | int,
               n_mid: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, valid = self.index.search_rows(self.layer, qg.transpose(0, 1), count)  # (Hkv, T, count)
        live = int(live)
        valid[..., live:] = False
        return ids.transpose(0, 1).to(self.device), valid.transpose(0, 1).to(self.device)

    def state_bytes(self) -> int:
        return self.index.nbytes(self.layer)

    def read_bytes(self, cap: int) -> int:
        return 0  # metered by the index, search by search


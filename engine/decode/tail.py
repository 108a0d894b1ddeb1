"""The tail anchors of every layer: a fixed-capacity ring on the compute device.

``k, v: (L, 1, Hkv, C, d)``; ``pos: (C,)`` int64 token position of each slot, -1 where empty (all
layers hold the same positions); ``lane: (C,)`` int64, the sequence a slot belongs to when several
share the document (batched questions, :mod:`.lanes`), -1 for the document's own tokens.  New
tokens are written at slots the host computes (:meth:`slots_for`); the oldest leave from the front
(:meth:`pop_oldest`).  A query at position p sees the slots with ``0 <= pos <= p`` (:meth:`visible`;
in a batch, only the document's and its own lane's), so the ring needs no reordering, shapes never
change between spills, and writing is one ``index_copy_`` per layer: a step can be captured in a
CUDA graph.  Capacity changes only in :meth:`reserve` (a new buffer: ``version`` changes).
"""

from __future__ import annotations

import torch


class TailRing:
    def __init__(self, layers: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device | str, capacity: int) -> None:
        self.k = torch.zeros(layers, 1, heads, capacity, dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        self.lane = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        self.start = 0  # slot of the oldest token
        self.n = 0  # tokens held
        self.version = 0

    @property
    def capacity(self) -> int:
        return self.pos.shape[0]

    def slots_for(self, count: int) -> torch.Tensor:
        """Slots ``(count,)`` (host int64) the next ``count`` tokens go to."""
        if self.n + count > self.capacity:
            raise RuntimeError(f"the tail holds {self.n} of {self.capacity} tokens: reserve room for {count} more first")
        return (self.start + self.n + torch.arange(count)) % self.capacity

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """One layer's keys and values ``(1, Hkv, T, d)`` into ``slots: (T,)`` (device)."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)

    def visible(self, q_pos: torch.Tensor, q_lane: torch.Tensor | None = None) -> torch.Tensor:
        """``(T, 1, C)`` bool: the slots a query at each of ``q_pos: (T,)`` sees; with ``q_lane:
        (T,)`` (a batch of sequences), only the document's slots and those of its own lane."""
        seen = (self.pos >= 0) & (self.pos[None, :] <= q_pos[:, None])
        if q_lane is not None:
            seen &= (self.lane < 0) | (self.lane[None, :] == q_lane[:, None])
        return seen[:, None, :]

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Tokens of every layer ``(L, 1, Hkv, m, d)`` at ``positions: (m,)``, outside a step."""
        m = positions.shape[0]
        self.reserve(self.n + m)
        slots = self.slots_for(m).to(self.pos.device)
        self.k.index_copy_(3, slots, k.to(self.k.device, self.k.dtype))
        self.v.index_copy_(3, slots, v.to(self.v.device, self.v.dtype))
        self.pos.index_copy_(0, slots, positions.to(self.pos.device))
        self.n += m

    def ordered_slots(self) -> torch.Tensor:
        """Slots of the held tokens, oldest first ``(n,)`` (device)."""
        return ((self.start + torch.arange(self.n)) % self.capacity).to(self.pos.device)

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Held tokens oldest first: keys, values ``(L, 1, Hkv, n, d)`` and positions ``(n,)`` (copies)."""
        slots = self.ordered_slots()
        return self.k.index_select(3, slots), self.v.index_select(3, slots), self.pos.index_select(0, slots)

    def pop_oldest(self, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove the oldest ``m`` tokens; -> their keys, values ``(L, 1, Hkv, m, d)`` and positions."""
        slots = ((self.start + torch.arange(m)) % self.capacity).to(self.pos.device)
        out = self.k.index_select(3, slots), self.v.index_select(3, slots), self.pos.index_select(0, slots)
        self.pos.index_fill_(0, slots, -1)
        self.start = (self.start + m) % self.capacity
        self.n -= m
        return out

    def truncate(self, n: int) -> None:
        """Forget the newest tokens beyond the oldest ``n`` (a question's scratch tokens)."""
        if n < self.n:
            slots = ((self.start + torch.arange(n, self.n)) % self.capacity).to(self.pos.device)
            self.pos.index_fill_(0, slots, -1)
            self.lane.index_fill_(0, slots, -1)
            self.n = n

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` tokens in all; a new buffer (oldest first from slot 0) if needed."""
        if tokens <= self.capacity:
            return
        k, v, pos = self.view()
        layers, _, heads, _, dim = self.k.shape
        self.k = self.k.new_zeros(layers, 1, heads, tokens, dim)
        self.v = torch.zeros_like(self.k)
        self.pos = self.pos.new_full((tokens,), -1)
        self.lane = self.lane.new_full((tokens,), -1)  # lanes live within one batch, which reserves first
        n, self.start, self.n = self.n, 0, 0
        self.version += 1
        if n:
            self.append(k, v, pos)

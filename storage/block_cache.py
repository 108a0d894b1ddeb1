"""A least-recently-used cache of stored blocks, bounded in bytes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import numpy as np


class BlockCache:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0
        self.peak_bytes = 0
        self._blocks: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    def get(self, key: Hashable) -> np.ndarray | None:
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
        return block

    def put(self, key: Hashable, block: np.ndarray) -> None:
        """Insert (or replace) a block, evicting the least recently used ones to stay in bound.
        A block larger than the whole capacity is not kept."""
        self.discard(key)
        if block.nbytes > self.capacity_bytes:
            return
        self._blocks[key] = block
        self.nbytes += block.nbytes
        while self.nbytes > self.capacity_bytes:
            _, old = self._blocks.popitem(last=False)
            self.nbytes -= old.nbytes
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def discard(self, key: Hashable) -> None:
        old = self._blocks.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self._blocks.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

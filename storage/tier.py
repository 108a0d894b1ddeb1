"""The tier protocol, and the two in-memory tiers (compute device, host memory).

A tier holds the offloaded mid-region rows of one sequence, for every layer: per layer, row ``i``
is the ``i``-th token written, for every KV head.  Shapes:

- ``append(layer, keys, values, positions)``: ``keys, values: (Hkv, n, d)``, ``positions: (n,)``
  the tokens' positions in the sequence.  The prefill writes its mid rows this way, chunk by
  chunk; tokens spilled from the tail later are appended the same way.
- ``gather(layer, ids) -> (keys, values)``: ``ids: (Hkv, K)`` row ids per KV head (each head its
  own set) -> ``(Hkv, K, d)`` each, on the compute device, bit-identical to what was written, in
  the order asked.  Every gather is metered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .host_memory import alloc_host, device_view, zero_copy_possible
from .meter import ByteMeter, Counters
from .rows import check_dtype, pack, row_bytes


@dataclass(frozen=True, slots=True)
class TierLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        if min(self.num_layers, self.num_kv_heads, self.head_dim) < 1:
            raise ValueError(f"layout sizes must be positive: {self}")

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's key + value for one KV head."""
        return row_bytes(self.head_dim, self.dtype)


@runtime_checkable
class KVTier(Protocol):
    name: str
    layout: TierLayout

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None: ...

    def gather(self, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def num_rows(self, layer: int) -> int: ...

    def positions(self, layer: int) -> np.ndarray: ...

    def close(self) -> None: ...


def check_append(layout: TierLayout, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
    if not 0 <= layer < layout.num_layers:
        raise IndexError(f"layer {layer} is outside 0..{layout.num_layers - 1}")
    h, _, d = keys.shape
    if (h, d) != (layout.num_kv_heads, layout.head_dim) or keys.dtype != layout.dtype:
        raise ValueError(
            f"rows of shape {tuple(keys.shape)} {keys.dtype} do not fit the tier's layout "
            f"({layout.num_kv_heads} KV heads, head dim {layout.head_dim}, {layout.dtype})"
        )
    if positions.shape != (keys.shape[1],):
        raise ValueError(f"{keys.shape[1]} rows need {keys.shape[1]} positions, got shape {tuple(positions.shape)}")


class MemoryTier:
    """Rows in one tensor per layer, token-major ``(capacity, Hkv, 2, d)`` (the first n rows of a
    layer are one contiguous span), on the compute device (tier "device") or in host memory (tier
    "cpu").  Host memory is pinned when CUDA is present; the GPU then reads the rows it needs
    straight from host memory (zero-copy, through a device view of the pinned buffer) when cupy is
    installed, else rows are selected on the CPU and copied (``zero_copy=False`` forces that, for
    comparison).

    :meth:`device_rows` gives the decode path a tensor the compute device reads directly (the
    buffer itself, or its zero-copy view), so that gathering needs no host work; its capacity
    changes only in :meth:`append` and :meth:`reserve`, which then bump ``version``."""

    def __init__(
        self,
        name: str,
        layout: TierLayout,
        storage_device: torch.device | str,
        compute_device: torch.device | str = "cpu",
        meter: ByteMeter | None = None,
        initial_capacity: int = 1024,
        zero_copy: bool | None = None,
    ) -> None:
        self.name = name
        self.layout = layout
        self.storage_device = torch.device(storage_device)
        self.compute_device = torch.device(compute_device)
        self.meter = meter if meter is not None else ByteMeter()
        self._pinned = self.storage_device.type == "cpu" and self.compute_device.type == "cuda"
        can = self._pinned and zero_copy_possible(self.compute_device)
        if zero_copy and not can:
            raise ValueError("zero-copy reads need pinned host memory, a CUDA compute device and cupy")
        self._zero_copy = can if zero_copy is None else zero_copy
        self.version = 0
        self._rows: list[torch.Tensor] = [self._alloc(initial_capacity) for _ in range(layout.num_layers)]
        self._views: list[torch.Tensor | None] = [self._device_view(r) for r in self._rows]
        self._n = [0] * layout.num_layers
        self._positions: list[list[np.ndarray]] = [[] for _ in range(layout.num_layers)]

    def _alloc(self, capacity: int) -> torch.Tensor:
        lay = self.layout
        shape = (capacity, lay.num_kv_heads, 2, lay.head_dim)
        if self.storage_device.type == "cpu":
            return alloc_host(shape, lay.dtype, self.compute_device)
        return torch.empty(shape, dtype=lay.dtype, device=self.storage_device)

    def _device_view(self, host: torch.Tensor) -> torch.Tensor | None:
        """A CUDA tensor aliasing the pinned host buffer (UVA), or None."""
        return device_view(host, self.compute_device) if self._zero_copy else None

    def _resize(self, layer: int, capacity: int) -> None:
        grown = self._alloc(capacity)
        n = self._n[layer]
        grown[:n].copy_(self._rows[layer][:n])
        self._rows[layer] = grown
        self._views[layer] = self._device_view(grown)
        self.version += 1

    @property
    def capacity(self) -> int:
        """Rows every layer holds without reallocating."""
        return min((r.shape[0] for r in self._rows), default=0)

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` rows in every layer without reallocating."""
        for layer in range(self.layout.num_layers):
            if rows > self._rows[layer].shape[0]:
                self._resize(layer, rows)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        check_append(self.layout, layer, keys, values, positions)
        n, m = self._n[layer], keys.shape[1]
        if n + m > self._rows[layer].shape[0]:
            self._resize(layer, max(2 * self._rows[layer].shape[0], n + m))
        self._rows[layer][n : n + m].copy_(pack(keys, values).transpose(0, 1))
        self._n[layer] = n + m
        self._positions[layer].append(positions.detach().cpu().numpy().astype(np.int64))

    def device_rows(self, layer: int) -> torch.Tensor | None:
        """``(capacity, Hkv, 2, d)``: the layer's buffer as the compute device reads it (rows past
        :meth:`num_rows` are unwritten), or None where it cannot read host memory directly."""
        if self.storage_device == self.compute_device:
            return self._rows[layer]
        return self._views[layer]

    def gather(self, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids: (Hkv, K)`` int64 row ids (< num_rows) -> keys, values ``(Hkv, K, d)``."""
        lay = self.layout
        h, k = ids.shape
        src = self.device_rows(layer)
        src = self._rows[layer] if src is None else src
        flat = (ids.to(src.device) * h + torch.arange(h, device=src.device)[:, None]).reshape(-1)  # (Hkv K,)
        out = src.view(-1, 2 * lay.head_dim).index_select(0, flat)
        out = out.view(h, k, 2, lay.head_dim).to(self.compute_device, non_blocking=True)
        nbytes = h * k * lay.row_bytes
        self.meter.record(self.name, layer, Counters(logical=nbytes, physical=nbytes, h2d=self.h2d(nbytes), rows=h * k, gathers=1))
        return out[:, :, 0], out[:, :, 1]

    def h2d(self, nbytes: int) -> int:
        """Of ``nbytes`` read, how many cross from host to device memory."""
        return nbytes if self.compute_device.type == "cuda" and self.storage_device.type == "cpu" else 0

    def num_rows(self, layer: int) -> int:
        return self._n[layer]

    def positions(self, layer: int) -> np.ndarray:
        parts = self._positions[layer]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def rows(self, layer: int) -> torch.Tensor:
        """All rows of ``layer``, ``(Hkv, n, 2, d)`` (a view; unmetered; for persisting)."""
        return self._rows[layer][: self._n[layer]].transpose(0, 1)

    @property
    def zero_copy(self) -> bool:
        return self._zero_copy

    def close(self) -> None:
        self._rows = []
        self._views = []


def device_tier(layout: TierLayout, device: torch.device | str, meter: ByteMeter | None = None) -> MemoryTier:
    """Everything on the compute device (offload target ``device``)."""
    return MemoryTier("device", layout, device, device, meter)


def host_tier(
    layout: TierLayout, compute_device: torch.device | str = "cpu", meter: ByteMeter | None = None,
    initial_capacity: int = 1024, zero_copy: bool | None = None,
) -> MemoryTier:
    """Host memory (offload target ``cpu``): pinned and read zero-copy when CUDA is present."""
    return MemoryTier("cpu", layout, "cpu", compute_device, meter, initial_capacity, zero_copy)

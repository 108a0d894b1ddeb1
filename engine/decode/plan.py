"""The decode plan: what one forward step reads, fixed for a range of mid-region sizes.

A plan fixes every shape of a step (query count, rows covered, units selected per KV head), so the
per-layer path makes no Python decision per head or position and, on CUDA, a step can be captured
once as a graph and replayed.  What changes from step to step lives in :class:`StepInputs`, device
tensors written before each step.

The plan covers mid-regions of up to ``mid_cap`` rows.  For eager steps (the CPU path, the disk
tier, the question's batch) it is made for the exact current size: the step reads exactly
``K = ceil(b |M|)`` tokens.  For captured steps it leaves room for ``horizon`` more rows (spilled
tail tokens): it selects the K of ``mid_cap`` units and marks those ranked past the live K invalid,
so a spill needs no new graph until the mid-region outgrows the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..rule.methods import MethodRule


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """Static shape of a step.  ``rows``: mid rows read per KV head and query (dense: ``mid_cap``;
    topk/rc: ``units * block``; sink-tail: 0)."""

    method: MethodRule
    budget: float
    queries: int  # T query positions per step
    mid_cap: int  # rows every buffer the step reads covers; valid while the mid-region is no larger
    block: int  # tokens per selected unit (1: token-level)
    units: int  # units selected per KV head and query
    every_position: bool  # logits of every position (teacher forcing), or of the last
    fused: bool  # the rule through the fused kernels where they apply
    version: tuple  # the buffers it was made against (KVState.buffers_version)
    lanes: bool = False  # the queries belong to several sequences sharing the document (StepInputs.lanes)

    @staticmethod
    def make(method: MethodRule, budget: float, queries: int, mid_len: int, mid_cap: int, block: int,
             every_position: bool, fused: bool, version: tuple, lanes: bool = False) -> "DecodePlan":
        units = math.ceil(method.count(budget, mid_cap) / block) if method.selects else 0
        return DecodePlan(method, budget, queries, mid_cap, block, units, every_position, fused, version, lanes)

    @property
    def rows(self) -> int:
        if self.method.name == "dense":
            return self.mid_cap
        return self.units * self.block

    def live_units(self, mid_len: int) -> int:
        """Units the rule asks for at mid-region size ``mid_len`` (the rest are padding)."""
        return math.ceil(self.method.count(self.budget, mid_len) / self.block) if self.method.selects else 0

    def covers(self, mid_len: int) -> bool:
        return mid_len <= self.mid_cap


class StepInputs:
    """One step's device inputs, written with one copy from a (pinned) host buffer:
    ``ids, positions: (1, T)`` int64, ``slots: (T,)`` the tail slots of the new tokens and
    ``lanes: (T,)`` the sequence of each (-1: the document's own; read by steps of several)."""

    def __init__(self, queries: int, device: torch.device) -> None:
        self.queries = queries
        pinned = device.type == "cuda"
        self._host = torch.full((4 * queries,), -1, dtype=torch.int64, pin_memory=pinned)
        self._dev = self._host if device.type == "cpu" else self._host.to(device)
        self.ids = self._dev[:queries].view(1, queries)
        self.positions = self._dev[queries : 2 * queries].view(1, queries)
        self.slots = self._dev[2 * queries : 3 * queries]
        self.lanes = self._dev[3 * queries :]

    @property
    def q_pos(self) -> torch.Tensor:
        """``(T,)`` the query positions."""
        return self.positions[0]

    def fill(self, ids: torch.Tensor, start: int, slots: torch.Tensor) -> None:
        """A step's token ids ``(1, T)`` (host), positions from ``start`` and tail slots ``(T,)``."""
        t = self.queries
        self._host[:t] = ids.reshape(-1)
        self._host[t : 2 * t] = torch.arange(start, start + t)
        self._host[2 * t : 3 * t] = slots
        if self._dev is not self._host:
            self._dev.copy_(self._host, non_blocking=True)

    def fill_lanes(self, ids: list[int], positions: list[int], slots: list[int], lanes: list[int]) -> None:
        """A step of several sequences: token ``i`` of lane ``lanes[i]`` at ``positions[i]`` into
        tail slot ``slots[i]``."""
        self._host[:] = torch.tensor([*ids, *positions, *slots, *lanes], dtype=torch.int64)
        if self._dev is not self._host:
            self._dev.copy_(self._host, non_blocking=True)

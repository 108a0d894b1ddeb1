"""The byte meter: every byte read, per tier, per layer, per decode step and per run.

- ``logical``: rows asked for times row bytes (key + value).
- ``physical``: bytes actually moved to serve them: whole blocks or chunks read from a store
  (read amplification included), rows copied or read over PCIe from host memory.
- ``h2d``: bytes that crossed from host to device memory (0 on a machine without an accelerator).
- ``disk_read``: bytes the process read from storage devices while gathering (psutil
  ``read_bytes``; page-cache hits read nothing; None where the platform does not report it).
- ``cache_hits`` / ``cache_misses``: blocks served from / missing in a block cache.
- ``net_bytes`` / ``net_gets``: bytes fetched over the network and the (ranged) GET requests that
  fetched them, from a store at an ``s3://`` URL (apart from ``disk_read``, which is local).
- Selection cost, kept apart, per tier: the bytes a selector read to choose the rows (a flat
  index reads every key of the searched head; a device selector its device-resident keys or block
  bounds, tier ``device``).
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import psutil


@dataclass(slots=True)
class Counters:
    logical: int = 0
    physical: int = 0
    h2d: int = 0
    disk_read: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    rows: int = 0
    gathers: int = 0
    net_bytes: int = 0
    net_gets: int = 0

    def add(self, other: "Counters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(slots=True)
class IndexCounters:
    bytes: int = 0  # key bytes the index touched to select
    searches: int = 0
    vectors: int = 0  # key vectors compared

    def add(self, other: "IndexCounters") -> None:
        self.bytes += other.bytes
        self.searches += other.searches
        self.vectors += other.vectors


class ByteMeter:
    """Accumulates counters keyed by (tier, layer, step); ``next_step()`` starts a decode step.

    Step 0 is everything before the first ``next_step()`` (the prefill's reads, if any)."""

    def __init__(self) -> None:
        self.step = 0
        self._reads: dict[tuple[str, int, int], Counters] = defaultdict(Counters)
        self._index: dict[tuple[str, int, int], IndexCounters] = defaultdict(IndexCounters)
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Reads within this block are not counted (housekeeping, such as rebuilding a summary)."""
        old, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = old

    def next_step(self) -> int:
        self.step += 1
        return self.step

    def record(self, tier: str, layer: int, counters: Counters) -> None:
        if self._paused:
            return
        self._reads[(tier, layer, self.step)].add(counters)

    def record_index(self, layer: int, nbytes: int, vectors: int, searches: int = 1, tier: str = "cpu") -> None:
        """Selection reads: ``nbytes`` of keys (or key summaries) in ``tier``, ``vectors`` compared."""
        if self._paused:
            return
        self._index[(tier, layer, self.step)].add(IndexCounters(nbytes, searches, vectors))

    def reset(self) -> None:
        self.step = 0
        self._reads.clear()
        self._index.clear()

    def totals(self, tier: str | None = None, layer: int | None = None, step: int | None = None, since: int | None = None) -> Counters:
        """Sum of the counters that match every given key (``since``: steps from that one on)."""
        out = Counters()
        for (t, l, s), c in self._reads.items():
            if (tier is None or t == tier) and (layer is None or l == layer) and _step_ok(s, step, since):
                out.add(c)
        return out

    def index_totals(self, layer: int | None = None, step: int | None = None, since: int | None = None,
                     tier: str | None = None) -> IndexCounters:
        out = IndexCounters()
        for (t, l, s), c in self._index.items():
            if (tier is None or t == tier) and (layer is None or l == layer) and _step_ok(s, step, since):
                out.add(c)
        return out

    def index_tiers(self, since: int | None = None) -> list[str]:
        """Tiers selection read from (at or after step ``since``)."""
        return sorted({t for t, _, s in self._index if _step_ok(s, None, since)})

    def tiers(self, since: int | None = None) -> list[str]:
        """Tiers read from (at or after step ``since``)."""
        return sorted({t for t, _, s in self._reads if _step_ok(s, None, since)})

    def summary(self) -> dict:
        """A plain, JSON-ready dict: run totals, by tier, by tier and layer, per step, selection."""
        tiers = sorted({t for t, _, _ in self._reads})
        steps = sorted({s for _, _, s in self._reads} | {s for _, _, s in self._index})
        layers = sorted({l for _, l, _ in self._reads} | {l for _, l, _ in self._index})
        return {
            "steps": self.step,
            "total": asdict(self.totals()),
            "by_tier": {t: asdict(self.totals(tier=t)) for t in tiers},
            "by_tier_layer": {t: {str(l): asdict(self.totals(tier=t, layer=l)) for l in layers} for t in tiers},
            "per_step": [
                {"step": s, "by_tier": {t: asdict(self.totals(tier=t, step=s)) for t in tiers}, "index": asdict(self.index_totals(step=s))}
                for s in steps
            ],
            "index": asdict(self.index_totals()),
            "index_by_tier": {t: asdict(self.index_totals(tier=t)) for t in self.index_tiers()},
            "index_by_layer": {str(l): asdict(self.index_totals(layer=l)) for l in layers},
        }


def _step_ok(s: int, step: int | None, since: int | None) -> bool:
    return (step is None or s == step) and (since is None or s >= since)


_PROCESS: dict[int, psutil.Process] = {}  # by pid (a forked child gets its own)


def process_disk_read_bytes() -> int | None:
    """Bytes this process has read from storage devices so far (None where unavailable)."""
    try:
        pid = os.getpid()
        proc = _PROCESS.get(pid)
        if proc is None:  # building a Process costs more than reading its counters: once per process
            proc = _PROCESS.setdefault(pid, psutil.Process(pid))
        return proc.io_counters().read_bytes
    except (AttributeError, NotImplementedError, psutil.AccessDenied):
        return None

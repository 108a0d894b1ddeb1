"""One document's KV side after prefill, on the compute device and in a tier (model-agnostic).

- anchors: ``sink_k, sink_v: (L, 1, Hkv, S, d)`` and the tail ring (``tail.py``);
- the mid-region: rows in a storage tier (host memory, device, or Zarr on disk);
- per layer: a selector (its selection state) and, for ``rc``, a feature map and the summary of
  the mid-region (fp32);
- step scalars on the device: ``n_mid`` (mid rows) and ``live`` (units the rule asks for), which
  change only between steps (spills, configuration).

Tokens leave the tail in spills (:meth:`spill`): the oldest go to the tier, the selection state and
the summary together, so the three always cover the same mid-region.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ...storage import ByteMeter, KVTier, MemoryTier
from ..config import EngineConfig
from ..calibration.maps_file import layer_params
from ..rule.estimators import build_feature_map
from ..rule.feature_maps import CentroidFeatures, EstimatorSpec, FeatureMap
from ..rule.methods import method_rule
from ..rule.summary import Summary
from . import kernels
from .plan import DecodePlan, StepInputs
from .selectors import BlockSelector, ExactSelector, FaissSelector, Selector
from .tail import TailRing

if TYPE_CHECKING:
    from ...storage import KeyIndex

# Rows a captured step's plan covers beyond the current mid-region: spilled tail tokens fit without
# a new graph for this many tokens (at 1 % it pads K by at most 11 rows).
PLAN_HORIZON = 1024
# Summaries and spills are built in chunks of this many tokens (bounds the fp32 temporaries).
CHUNK_TOKENS = 4096
# Tail slots beyond tail + spill: a short question and its answer fit without a new ring (and so
# without a new CUDA graph).
TAIL_HEADROOM = 64


class KVState:
    """See the module docstring.  ``index`` is the FAISS key index (selector ``faiss`` only)."""

    def __init__(self, config: EngineConfig, layers: int, heads: int, dim: int, dtype: torch.dtype,
                 device: torch.device, tier: KVTier, meter: ByteMeter, index: KeyIndex | None = None) -> None:
        self.config = config = config.resolved()
        self.num_layers, self.num_kv_heads, self.head_dim = layers, heads, dim
        self.dtype, self.device = dtype, torch.device(device)
        self.tier, self.meter, self.index = tier, meter, index
        sink = config.sink
        self.sink_k = torch.zeros(layers, 1, heads, sink, dim, dtype=dtype, device=device)  # filled by set_anchors
        self.sink_v = torch.zeros_like(self.sink_k)
        self.tail = TailRing(layers, heads, dim, dtype, device, config.tail + config.spill + TAIL_HEADROOM)
        self.selectors: list[Selector] = [self._new_selector(layer) for layer in range(layers)]
        self.maps: list[FeatureMap | None] = [None] * layers
        self.summaries: list[Summary | None] = [None] * layers
        # Centroid estimator: the centroid of every mid row, (Hkv, capacity) int32 (the fused
        # kernels subtract a retrieved token's share of the summary through it).
        self.clusters: list[torch.Tensor | None] = [None] * layers
        self.n_mid = torch.zeros((), dtype=torch.int64, device=device)
        self.live = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0  # tokens of the sequence so far
        self.spilled = 0  # tokens spilled from the tail so far
        self.spill_enabled = True
        self.version = 0  # bumped when maps or summaries are replaced
        self.step: StepInputs | None = None  # the running step's inputs (set by the runner)
        self.plan: DecodePlan | None = None  # the running step's plan
        # Rows (x KV heads) a step of several sequences read per layer, their union: device scalars.
        self.union_rows: list[torch.Tensor] = [torch.zeros((), dtype=torch.int64)] * layers
        # Called by decode attention with (layer, qg, anchors, q_pos) when set: evaluation hooks in
        # (bench-io); None on the normal path (and no graph is captured while it is set).
        self.probe: Callable[..., None] | None = None
        self._estimators: dict[EstimatorSpec, list[tuple[FeatureMap | None, Summary | None]]] = {}
        self._selectors: dict[tuple[str, int], list[Selector]] = {}  # built for other selectors, by (name, block)

    def _new_selector(self, layer: int) -> Selector:
        return _selector(self.config, layer, self.num_kv_heads, self.head_dim, self.dtype, self.device, self.index)

    # -- building ----------------------------------------------------------------------------

    def set_anchors(self, layer: int, sink_k: torch.Tensor, sink_v: torch.Tensor) -> None:
        """A layer's sink tokens ``(1, Hkv, S', d)``, S' <= sink."""
        s = sink_k.shape[2]
        if s != self.sink_k.shape[3]:
            self.sink_k = self.sink_k[:, :, :, :s].clone()
            self.sink_v = self.sink_v[:, :, :, :s].clone()
        self.sink_k[layer].copy_(sink_k)
        self.sink_v[layer].copy_(sink_v)

    def add_mid(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, in_tier: bool = False) -> None:
        """Rows ``(1, Hkv, n, d)`` at ``positions: (n,)`` appended to a layer's mid-region: tier,
        selection state and summary (in chunks).  ``in_tier``: the tier holds them already (its
        last n rows: a prefill that streamed them)."""
        summary, fmap = self.summaries[layer], self.maps[layer]
        first = self.tier.num_rows(layer) - (k.shape[2] if in_tier else 0)
        for start in range(0, k.shape[2], CHUNK_TOKENS):
            part = slice(start, start + CHUNK_TOKENS)
            kp, vp = k[:, :, part], v[:, :, part]
            if not in_tier:
                self.tier.append(layer, kp[0], vp[0], positions[part])
            self.selectors[layer].add(kp[0])
            self.assign_clusters(layer, kp, first + start)
            if summary is not None:
                summary.fold(fmap.key_logits(kp), vp)

    def wants_clusters(self, layer: int) -> bool:
        """Whether the layer keeps the centroid of every mid row (a centroid map, read by the fused
        kernels only)."""
        return isinstance(self.maps[layer], CentroidFeatures) and kernels.available(self.device)

    def set_clusters(self, layer: int, ids: torch.Tensor) -> None:
        """Centroid ids ``(Hkv, n)`` of the mid rows, saved with a persisted document."""
        buf = torch.zeros(self.num_kv_heads, max(ids.shape[1], self.mid_len), dtype=torch.int32, device=self.device)
        buf[:, : ids.shape[1]] = ids.to(self.device, torch.int32)
        self.clusters[layer] = buf
        self.version += 1

    def assign_clusters(self, layer: int, k: torch.Tensor, start: int) -> None:
        """Record the centroid of mid rows ``start..`` (keys ``(1, Hkv, m, d)``), for a centroid map."""
        fmap = self.maps[layer]
        if not self.wants_clusters(layer) or k.shape[2] == 0:
            return  # only the fused kernels read them
        m = k.shape[2]
        buf = self.clusters[layer]
        if buf is None or buf.shape[1] < start + m:
            grown = torch.zeros(self.num_kv_heads, max(start + m, self.mid_len), dtype=torch.int32, device=self.device)
            if buf is not None:
                grown[:, : buf.shape[1]] = buf
            self.clusters[layer] = buf = grown
            self.version += 1
        buf[:, start : start + m] = fmap.assign(k)[0].to(torch.int32)

    def build_summary(self, layer: int, k_mid: torch.Tensor | None = None) -> None:
        """The layer's feature map and an empty summary under the configured estimator (fitted maps
        see ``k_mid``); :meth:`add_mid` then folds rows in."""
        fmap, summary = self._empty_estimator(self.config.estimator, layer, k_mid)
        self.maps[layer], self.summaries[layer] = fmap, summary

    def _empty_estimator(self, spec: EstimatorSpec, layer: int, k_mid: torch.Tensor | None) -> tuple[FeatureMap | None, Summary | None]:
        learned = None
        if spec.kind == "learned":
            learned = layer_params(spec.maps, layer, self.num_kv_heads, self.head_dim, self.device)
        fmap = build_feature_map(spec, layer, k_mid, self.num_kv_heads, self.head_dim, self.device, learned)
        if fmap is None:
            return None, None
        return fmap, Summary.empty(1, self.num_kv_heads, fmap.num_features, self.head_dim, self.device)

    def _summarise(self, spec: EstimatorSpec, layer: int, k_mid: torch.Tensor, v_mid: torch.Tensor) -> tuple[FeatureMap | None, Summary | None]:
        """Feature map and summary of ``k_mid, v_mid: (1, Hkv, n, d)`` under ``spec``."""
        fmap, summary = self._empty_estimator(spec, layer, k_mid)
        if summary is not None:
            for start in range(0, k_mid.shape[2], CHUNK_TOKENS):
                part = slice(start, start + CHUNK_TOKENS)
                summary.fold(fmap.key_logits(k_mid[:, :, part]), v_mid[:, :, part])
        return fmap, summary

    # -- the mid-region and the step scalars --------------------------------------------------

    @property
    def mid_len(self) -> int:
        return self.tier.num_rows(0)

    def rows_resident(self) -> bool:
        """Whether the mid rows are in the compute device's own memory (the device tier)."""
        return isinstance(self.tier, MemoryTier) and self.tier.storage_device == self.tier.compute_device

    def device_rows(self, layer: int) -> torch.Tensor | None:
        """The layer's mid rows as the compute device reads them in place ``(capacity, Hkv, 2, d)``,
        or None where the tier is read on the host (disk; pinned memory without zero-copy)."""
        return self.tier.device_rows(layer) if isinstance(self.tier, MemoryTier) else None

    def reads_blocks_in_place(self) -> bool:
        """Whether steps read their selected rows in place from the tier's block cache (the disk
        tier, with a selector on the compute device): the tier then reads only missing blocks."""
        return (getattr(self.tier, "reads_in_place", False) and self.method.selects
                and self.selectors[0].on_device)

    def step_blocks(self) -> int:
        """Blocks of the tier's block cache a single-token step reads at most, all layers (the
        cache must hold them at once for the step to run deferred, as a graph)."""
        cap = self.mid_len + PLAN_HORIZON
        sel_block, tier_block = self.block, self.tier.block_tokens
        units = math.ceil(self.method.count(self.config.budget, cap) / sel_block)
        aligned = sel_block % tier_block == 0 or tier_block % sel_block == 0
        per_unit = -(-sel_block // tier_block) + (0 if aligned else 1)
        return self.num_layers * self.num_kv_heads * units * per_unit

    @property
    def method(self):  # noqa: ANN201 (a MethodRule)
        return method_rule(self.config.method)

    @property
    def block(self) -> int:
        return self.selectors[0].block if self.method.selects else 1

    def refresh(self) -> None:
        """Write ``n_mid`` and ``live`` for the current mid-region (between steps)."""
        n = self.mid_len
        self.n_mid.fill_(n)
        live = math.ceil(self.method.count(self.config.budget, n) / self.block) if self.method.selects else 0
        self.live.fill_(live)

    def graph_safe(self, queries: int = 1) -> bool:
        """Whether a step of ``queries`` tokens runs on the device alone (no host read, no host
        selection), so that it can be captured: the tier is read in place and the selector works
        on the device."""
        method = self.method
        reads_in_place = self.device_rows(0) is not None
        if self.reads_blocks_in_place():  # a captured step needs all of its blocks resident at once
            return queries * self.step_blocks() <= self.tier.cache.capacity
        return (reads_in_place or method.count(1.0, 1) == 0) and (not method.selects or self.selectors[0].on_device)

    def make_plan(self, queries: int, every_position: bool, captured: bool, lanes: bool = False) -> DecodePlan:
        """The plan of a step of ``queries`` positions (captured: with room for spills; ``lanes``:
        of several sequences)."""
        n = self.mid_len
        cap = n + PLAN_HORIZON if captured else n
        self.reserve(cap)
        version = self.buffers_version()
        return DecodePlan.make(self.method, self.config.budget, queries, n, cap, self.block, every_position, self.config.fused,
                               version, lanes)

    def reserve(self, rows: int) -> None:
        if hasattr(self.tier, "reserve"):  # memory tiers' rows, the disk tier's block table
            self.tier.reserve(rows)
        for sel in self.selectors:
            sel.reserve(rows)
        for layer, buf in enumerate(self.clusters):
            if buf is not None and buf.shape[1] < rows:
                grown = buf.new_zeros(buf.shape[0], rows)
                grown[:, : buf.shape[1]] = buf
                self.clusters[layer] = grown
                self.version += 1

    def buffers_version(self) -> tuple:
        """Changes whenever a buffer a captured step reads is replaced (grown, or another selector's
        or estimator's put in its place)."""
        tier = getattr(self.tier, "version", 0)
        return (self.version, self.tail.version, tier, *((id(s), s.version) for s in self.selectors))

    # -- spills -------------------------------------------------------------------------------

    def spill_if_full(self, new: int) -> None:
        """Once the tail holds ``tail + spill`` tokens, move its oldest ones to the mid-region,
        keeping ``tail`` tokens and never one of the ``new`` ones just written."""
        cfg = self.config
        count = min(self.tail.n - cfg.tail, self.tail.n - new)
        if not self.spill_enabled or self.tail.n < cfg.tail + cfg.spill or count <= 0:
            return
        if isinstance(self.tier, MemoryTier) and self.mid_len + count > self.tier.capacity:
            self.reserve(self.mid_len + count + PLAN_HORIZON)  # grow by a horizon, not by doubling
        k, v, pos = self.tail.pop_oldest(count)
        self._estimators.clear()  # other estimators' summaries and selectors no longer cover the mid-region
        self._selectors.clear()
        for layer in range(self.num_layers):
            self.add_mid(layer, k[layer], v[layer], pos.cpu())
        self.spilled += count
        self.refresh()

    # -- estimators ---------------------------------------------------------------------------

    def read_mid(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every mid-region row of ``layer`` from the tier, keys and values ``(1, Hkv, n, d)``; not
        metered (housekeeping and evaluation, not a question's cost)."""
        n = self.tier.num_rows(layer)
        with self.meter.paused():
            k, v = self.tier.gather(layer, torch.arange(n).expand(self.num_kv_heads, n))
        return k[None], v[None]

    def mid_keys(self, layer: int):  # noqa: ANN201 (an iterator)
        """The layer's mid keys from the tier, chunk by chunk: ``(start, keys (Hkv, m, d))`` in the
        model's dtype on the compute device; not metered (rebuilding state, not a question's cost)."""
        n, h = self.tier.num_rows(layer), self.num_kv_heads
        for start in range(0, n, CHUNK_TOKENS):
            m = min(CHUNK_TOKENS, n - start)
            with self.meter.paused():
                k, _ = self.tier.gather(layer, torch.arange(start, start + m).expand(h, m))
            yield start, k.to(self.device, self.dtype)

    def estimator_layers(self, spec: EstimatorSpec) -> list[tuple[FeatureMap | None, Summary | None]]:
        """Every layer's (feature map, summary) of the mid-region under ``spec``: the live ones if
        ``spec`` is in use, else built once from the tier's rows (one full read, not metered) and
        kept, so that switching is free afterwards."""
        if spec == self.config.estimator:
            return list(zip(self.maps, self.summaries, strict=True))
        if spec not in self._estimators:
            built = []
            for layer in range(self.num_layers):
                k, v = self.read_mid(layer)
                built.append(self._summarise(spec, layer, k.to(self.dtype), v.to(self.dtype)))
            self._estimators[spec] = built
        return self._estimators[spec]

    def use_estimator(self, spec: EstimatorSpec) -> None:
        """Switch every layer's completion estimator to ``spec`` (between questions)."""
        if spec == self.config.estimator:
            return
        layers = self.estimator_layers(spec)
        self._estimators[self.config.estimator] = list(zip(self.maps, self.summaries, strict=True))
        del self._estimators[spec]
        self.maps = [m for m, _ in layers]
        self.summaries = [s for _, s in layers]
        self.config = replace(self.config, estimator=spec)
        self.version += 1
        self.clusters = [None] * self.num_layers
        for layer, fmap in enumerate(self.maps):
            if isinstance(fmap, CentroidFeatures):
                k, _ = self.read_mid(layer)
                for start in range(0, k.shape[2], CHUNK_TOKENS):
                    self.assign_clusters(layer, k[:, :, start : start + CHUNK_TOKENS].to(self.dtype), start)

    def use_selector(self, name: str, block: int) -> None:
        """Switch every layer's selector (between questions); a new one's state is built once from
        the tier's keys (not metered) and kept, as for estimators."""
        blocked = ("block", "exact-block")
        key = (name, block if name in blocked else 1)
        current = (self.config.selector, self.config.select_block if self.config.selector in blocked else 1)
        if key == current:
            return
        if key not in self._selectors:
            cfg = replace(self.config, selector=name, select_block=block)
            if name == "faiss" and self.index is None:
                from ...storage import KeyIndex

                self.index = KeyIndex(cfg.index, self.num_layers, self.num_kv_heads, self.head_dim, self.meter)
            built = []
            for layer in range(self.num_layers):
                sel = _selector(cfg, layer, self.num_kv_heads, self.head_dim, self.dtype, self.device, self.index)
                sel.reserve(self.mid_len)
                k, _ = self.read_mid(layer)
                for start in range(0, k.shape[2], CHUNK_TOKENS):
                    sel.add(k[0, :, start : start + CHUNK_TOKENS].to(self.dtype))
                built.append(sel)
            self._selectors[key] = built
        self._selectors[current] = self.selectors
        self.selectors = self._selectors.pop(key)
        self.config = replace(self.config, selector=name, select_block=block)

    def configure(self, config: EngineConfig) -> None:
        """Method, budget, estimator and selector of the next steps (between questions)."""
        config = config.resolved()
        if config.estimator != self.config.estimator:
            self.use_estimator(config.estimator)
        self.use_selector(config.selector, config.select_block)
        self.config = config
        self.refresh()

    # -- sizes --------------------------------------------------------------------------------

    def summary_bytes_per_head(self) -> int:
        """Bytes per KV head and layer of the live summary and its map's state (0 without one)."""
        s, m = self.summaries[0], self.maps[0]
        return 0 if s is None else s.nbytes_per_head() + m.state_bytes_per_head()

    def device_bytes(self) -> dict[str, int]:
        """Memory held for the KV side, by part: anchors (sink and tail ring), selection state,
        summaries and maps with the centroid ids of every mid row (all layers), and the tier's rows where
        the tier is device memory."""
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        out = {
            "anchors": nbytes(self.sink_k) + nbytes(self.sink_v) + nbytes(self.tail.k) + nbytes(self.tail.v),
            "selection": sum(s.state_bytes() for s in self.selectors) if self.selectors[0].on_device else 0,
            "summaries": self.num_layers * self.num_kv_heads * self.summary_bytes_per_head()
            + sum(c.numel() * c.element_size() for c in self.clusters if c is not None),
        }
        if self.tier.name == "device":
            out["tier"] = self.mid_len * self.num_layers * self.tier.layout.row_bytes * self.num_kv_heads
        return out


def _selector(cfg: EngineConfig, layer: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device,
              index: KeyIndex | None) -> Selector:
    if cfg.selector == "exact":
        return ExactSelector(heads, dim, dtype, device)
    if cfg.selector == "exact-block":
        return ExactSelector(heads, dim, dtype, device, block=cfg.select_block)
    if cfg.selector == "block":
        return BlockSelector(heads, dim, dtype, device, cfg.select_block)
    if index is None:
        raise ValueError("the faiss selector needs a key index")
    return FaissSelector(index, layer, device)

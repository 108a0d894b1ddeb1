"""Our transformers Cache: the prefill buffer, then anchors on the device and the mid-region in a
storage tier, with its key index and summary.  One sequence (batch 1).

Life of a layer (DESIGN.md 3):

1. prefill: each chunk's keys and values join a buffer on the compute device; the chunk's queries
   attend exactly to everything so far (``prefill_attention``).
2. ``finalize_prefill``: the first ``sink`` and last ``tail`` tokens stay on the device; the mid-region
   goes to the tier, its keys to the key index, and a feature-map summary of it is built.
3. decode: new tokens join the tail; once it holds ``tail + spill`` tokens, its oldest ones spill to
   the tier, the index and the summary.

Shapes: keys and values ``(1, Hkv, n, d)``; the model's queries ``(1, Hq, T, d)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers import Cache

from ..storage import ByteMeter, KeyIndex, KVTier
from .config import EngineConfig
from .feature_maps import EstimatorSpec, FeatureMap, build_feature_map
from .summary import Summary


class _Growable:
    """A ``(1, H, capacity, d)`` key and value buffer that doubles when full."""

    def __init__(self, heads: int, dim: int, dtype: torch.dtype, device: torch.device, capacity: int) -> None:
        self.k = torch.empty(1, heads, capacity, dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.pos = torch.empty(capacity, dtype=torch.int64)
        self.n = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        m = k.shape[2]
        if self.n + m > self.k.shape[2]:
            cap = max(2 * self.k.shape[2], self.n + m)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_empty(*old.shape[:2], cap, old.shape[3])
                new[:, :, : self.n] = old[:, :, : self.n]
                setattr(self, name, new)
            pos_new = torch.empty(cap, dtype=torch.int64)
            pos_new[: self.n] = self.pos[: self.n]
            self.pos = pos_new
        self.k[:, :, self.n : self.n + m] = k
        self.v[:, :, self.n : self.n + m] = v
        self.pos[self.n : self.n + m] = pos.to("cpu")
        self.n += m

    def drop_front(self, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove and return the oldest ``m`` tokens (copies)."""
        out = (self.k[:, :, :m].clone(), self.v[:, :, :m].clone(), self.pos[:m].clone())
        rest = self.n - m
        self.k[:, :, :rest] = self.k[:, :, m : self.n].clone()
        self.v[:, :, :rest] = self.v[:, :, m : self.n].clone()
        self.pos[:rest] = self.pos[m : self.n].clone()
        self.n = rest
        return out

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, : self.n], self.v[:, :, : self.n]


@dataclass
class LayerState:
    """One layer's device-side state."""

    prefill: _Growable | None = None
    sink_k: torch.Tensor | None = None
    sink_v: torch.Tensor | None = None
    tail: _Growable | None = None
    feature_map: FeatureMap | None = None
    summary: Summary | None = None
    seen: int = 0  # tokens this layer has processed
    spilled: int = field(default=0)  # tokens spilled from the tail so far


class RCCache(Cache):
    """A transformers Cache whose attention is computed by rcengine (see hf_integration)."""

    def __init__(
        self,
        config: EngineConfig,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tier: KVTier,
        index: KeyIndex,
        meter: ByteMeter,
    ) -> None:
        super().__init__(layers=[])
        self.config = config
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.tier = tier
        self.index = index
        self.meter = meter
        self.phase = "prefill"
        self.spill_enabled = True
        # Called by decode attention with (layer, qg, sink_k, sink_v, tail_k, tail_v) for every query
        # token when set: evaluation hooks in (bench-io); None on the normal path.
        self.probe: Callable[..., None] | None = None
        self._estimators: dict[EstimatorSpec, list[tuple[FeatureMap | None, Summary | None]]] = {}
        self.state = [LayerState(prefill=_Growable(num_kv_heads, head_dim, dtype, device, 1024)) for _ in range(num_layers)]

    # -- the transformers Cache surface used by the supported models and their masks ----------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        st = self.state[layer_idx]
        t = key_states.shape[2]
        pos = torch.arange(st.seen, st.seen + t)
        if self.phase == "prefill":
            st.prefill.append(key_states, value_states, pos)
        else:
            st.tail.append(key_states, value_states, pos)
            self._spill_if_full(layer_idx, new=t)
        st.seen += t
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state[layer_idx].seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.state[layer_idx].seen

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:  # noqa: ANN001 (int, or a tensor of positions in older releases)
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.state[layer_idx].seen + q, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def __len__(self) -> int:
        return self.num_layers

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers

    # -- prefill -> decode ----------------------------------------------------------------------

    def finalize_prefill(self, progress=None) -> None:  # noqa: ANN001 (an optional callable(layer))
        """Split every layer's prefill buffer into anchors and mid-region, move the mid-region to
        the tier and the key index, and build its summary."""
        cfg = self.config
        for layer, st in enumerate(self.state):
            k, v = st.prefill.view()
            pos = st.prefill.pos[: st.prefill.n]
            n = k.shape[2]
            sink = min(cfg.sink, n)
            tail = min(cfg.tail, n - sink)
            mid = slice(sink, n - tail)
            st.sink_k, st.sink_v = k[:, :, :sink].clone(), v[:, :, :sink].clone()
            st.tail = _Growable(self.num_kv_heads, self.head_dim, self.dtype, self.device, cfg.tail + cfg.spill + 64)
            st.tail.append(k[:, :, n - tail :], v[:, :, n - tail :], pos[n - tail :])
            k_mid, v_mid = k[:, :, mid], v[:, :, mid]
            for start in range(0, k_mid.shape[2], 4096):
                part = slice(start, start + 4096)
                self.tier.append(layer, k_mid[0, :, part], v_mid[0, :, part], pos[mid][part])
                self.index.add(layer, k_mid[0, :, part])
            self._build_summary(layer, k_mid, v_mid)
            st.prefill = None
            if progress is not None:
                progress(layer)
        self.phase = "decode"

    def _build_summary(self, layer: int, k_mid: torch.Tensor, v_mid: torch.Tensor) -> None:
        st = self.state[layer]
        st.feature_map, st.summary = self._summarise(self.config.estimator, layer, k_mid, v_mid)

    def _summarise(self, spec: EstimatorSpec, layer: int, k_mid: torch.Tensor, v_mid: torch.Tensor) -> tuple[FeatureMap | None, Summary | None]:
        """Feature map and summary of ``k_mid, v_mid: (1, Hkv, n, d)`` under ``spec``."""
        fmap = build_feature_map(spec, layer, k_mid, self.num_kv_heads, self.head_dim, self.device)
        if fmap is None:
            return None, None
        summary = Summary.empty(1, self.num_kv_heads, fmap.num_features, self.head_dim, self.device)
        for start in range(0, k_mid.shape[2], 4096):
            ks = k_mid[:, :, start : start + 4096]
            summary.fold(fmap.key_logits(ks), v_mid[:, :, start : start + 4096])
        return fmap, summary

    def estimator_layers(self, spec: EstimatorSpec) -> list[tuple[FeatureMap | None, Summary | None]]:
        """Every layer's (feature map, summary) of the mid-region under ``spec``: the live ones if
        ``spec`` is in use, else built once from the tier's rows (one full read, not metered:
        housekeeping, not a question's cost) and kept, so that switching is free afterwards."""
        if spec == self.config.estimator:
            return [(st.feature_map, st.summary) for st in self.state]
        if spec not in self._estimators:
            built = []
            for layer in range(self.num_layers):
                k, v = self.read_mid(layer)
                built.append(self._summarise(spec, layer, k.to(self.dtype), v.to(self.dtype)))
            self._estimators[spec] = built
        return self._estimators[spec]

    def read_mid(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every mid-region row of ``layer`` from the tier, keys and values ``(1, Hkv, n, d)``; not
        metered (housekeeping and evaluation, not a question's cost)."""
        n = self.tier.num_rows(layer)
        with self.meter.paused():
            k, v = self.tier.gather(layer, torch.arange(n).expand(self.num_kv_heads, n))
        return k[None], v[None]

    def summary_bytes_per_head(self) -> int:
        """Bytes per KV head and layer of the live summary and its map's state (0 without one)."""
        st = self.state[0]
        return 0 if st.summary is None else st.summary.nbytes_per_head() + st.feature_map.state_bytes_per_head()

    def use_estimator(self, spec: EstimatorSpec) -> None:
        """Switch every layer's completion estimator to ``spec`` (see :meth:`estimator_layers`).
        Call between questions, not during generation: spills fold into the live summaries only."""
        if spec == self.config.estimator:
            return
        layers = self.estimator_layers(spec)
        self._estimators[self.config.estimator] = [(st.feature_map, st.summary) for st in self.state]
        del self._estimators[spec]
        for st, (fmap, summary) in zip(self.state, layers, strict=True):
            st.feature_map, st.summary = fmap, summary
        self.config = replace(self.config, estimator=spec)

    def _spill_if_full(self, layer: int, new: int) -> None:
        """Once the tail holds ``tail + spill`` tokens, move its oldest ones to the tier, index and
        summary, keeping ``tail`` tokens and never one of the ``new`` ones (their queries have not
        attended yet, and retrieval is not causal)."""
        cfg = self.config
        st = self.state[layer]
        count = min(st.tail.n - cfg.tail, st.tail.n - new)
        if not self.spill_enabled or st.tail.n < cfg.tail + cfg.spill or count <= 0:
            return
        k, v, pos = st.tail.drop_front(count)
        self._estimators.clear()  # other estimators' summaries no longer cover the mid-region
        self.tier.append(layer, k[0], v[0], pos)
        self.index.add(layer, k[0])
        if st.summary is not None:
            st.summary.fold(st.feature_map.key_logits(k), v)
        st.spilled += k.shape[2]

"""A document of a million mid tokens and more for the GPU decode benchmark, written to the host
tier directly: random rows, no prefill (``bench/scripts/gpu_decode.py``'s 1M-token case)."""

from __future__ import annotations

import torch

from ...engine.config import EngineConfig
from ...engine.decode.state import PLAN_HORIZON, KVState
from ...engine.hf.cache import RCCache
from ...engine.qa.document import Document
from ...engine.qa.engine import Engine
from ...storage import ByteMeter, MemoryTier, TierLayout


class AliasedHostTier(MemoryTier):
    """A pinned host tier whose layers share ``distinct`` row buffers, filled with random rows:
    the 1M-token case, whose 32 distinct layers would need 134 GB of host memory."""

    def __init__(self, layout: TierLayout, rows: int, distinct: int, meter: ByteMeter, seed: int = 0) -> None:
        super().__init__("cpu", layout, "cpu", "cuda", meter, initial_capacity=1)
        gen = torch.Generator(device="cuda").manual_seed(seed)
        buffers = []
        for _ in range(distinct):
            host = self._alloc(rows + 2 * PLAN_HORIZON)  # room for a captured plan: reserve() never reallocates
            host[rows:].zero_()
            for start in range(0, rows, 1 << 17):  # random rows made on the GPU, copied over in slices
                part = host[start : min(start + (1 << 17), rows)]
                part.copy_(torch.randn(part.shape, generator=gen, device="cuda", dtype=layout.dtype))
            buffers.append(host)
        self._rows = [buffers[layer % distinct] for layer in range(layout.num_layers)]
        self._views = [self._device_view(r) for r in self._rows]
        self._n = [rows] * layout.num_layers
        self._positions = [[torch.arange(4, 4 + rows).numpy()] for _ in range(layout.num_layers)]


def million_document(lm, n: int, selector: str) -> Document:  # noqa: ANN001
    """An rc document of ``n`` mid tokens written to the host tier directly (see AliasedHostTier)."""
    layers, heads, dim = lm.kv_shape
    cfg = EngineConfig(method="rc", budget=0.01, offload="cpu", selector=selector)
    meter = ByteMeter()
    tier = AliasedHostTier(TierLayout(layers, heads, dim, lm.dtype), n, 4, meter)
    state = KVState(cfg, layers, heads, dim, lm.dtype, lm.device, tier, meter)
    gen = torch.Generator(device="cuda").manual_seed(1)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=lm.dtype)  # noqa: E731
    state.reserve(n + 2 * PLAN_HORIZON)
    for layer in range(layers):
        state.set_anchors(layer, rnd(1, heads, cfg.sink, dim), rnd(1, heads, cfg.sink, dim))
        rows = tier.device_rows(layer)[:n]  # (n, Hkv, 2, d), read over PCIe
        state.build_summary(layer, rows[:65536, :, 0].transpose(0, 1)[None].clone())
        for start in range(0, n, 65536):
            part = rows[start : start + 65536].clone()  # (m, Hkv, 2, d) in device memory
            k, v = part[:, :, 0].transpose(0, 1)[None], part[:, :, 1].transpose(0, 1)[None]
            state.selectors[layer].add(k[0])
            state.assign_clusters(layer, k, start)  # each row's centroid: rc runs as the fused kernels, as add_mid's rows do
            state.summaries[layer].fold(state.maps[layer].key_logits(k), v)
    state.tail.append(rnd(layers, 1, heads, cfg.tail, dim), rnd(layers, 1, heads, cfg.tail, dim),
                      torch.arange(4 + n, 4 + n + cfg.tail))
    state.seen = 4 + n + cfg.tail
    state.refresh()
    engine = Engine(lm, cfg, show_progress=False)
    return Document(engine, RCCache(state, prefill=False), state.seen, None, 0.0, store=None, scratch=None)

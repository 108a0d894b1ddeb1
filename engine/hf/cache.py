"""Our transformers Cache: the prefill buffer, then the document's :class:`KVState` (anchors on the
device, the mid-region in a storage tier, selection state and summaries).  One sequence (batch 1).

Life of a layer:

1. prefill: each chunk's keys and values join a buffer on the compute device; the chunk's queries
   attend exactly to everything so far.
2. :meth:`RCCache.finalize_prefill`: the first ``sink`` and last ``tail`` tokens stay on the device;
   the mid-region goes to the tier, its keys to the selection state, and its summary is built.
3. decode: new tokens are written into the tail ring (``update``); after each step the runner
   spills the oldest to the mid-region once the tail is full.

Shapes: keys and values ``(1, Hkv, n, d)``; the model's queries ``(1, Hq, T, d)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Cache

from ..decode.state import PLAN_HORIZON, KVState

# The prefill buffer starts with room for this many tokens and doubles when full.
PREFILL_START_TOKENS = 1024


class PrefillBuffer:
    """A ``(1, H, capacity, d)`` key and value buffer that doubles when full."""

    def __init__(self, heads: int, dim: int, dtype: torch.dtype, device: torch.device, capacity: int) -> None:
        self.k = torch.empty(1, heads, capacity, dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.n = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        m = k.shape[2]
        if self.n + m > self.k.shape[2]:
            cap = max(2 * self.k.shape[2], self.n + m)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_empty(*old.shape[:2], cap, old.shape[3])
                new[:, :, : self.n] = old[:, :, : self.n]
                setattr(self, name, new)
        self.k[:, :, self.n : self.n + m] = k
        self.v[:, :, self.n : self.n + m] = v
        self.n += m

    def wrap(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hold ``k, v: (1, H, n, d)`` as they are (no copy): a whole prefill computed elsewhere."""
        self.k, self.v, self.n = k, v, k.shape[2]

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, : self.n], self.v[:, :, : self.n]


class RCCache(Cache):
    """A transformers Cache whose attention is computed by rcengine (see integration.py)."""

    def __init__(self, state: KVState, prefill: bool = True) -> None:
        super().__init__(layers=[])
        self.state = state
        self.phase = "prefill" if prefill else "decode"
        self._stream: tuple[int, int] | None = None  # streaming the mid rows: (tokens in all, rows written up to)
        s = state
        self.prefill = [PrefillBuffer(s.num_kv_heads, s.head_dim, s.dtype, s.device, PREFILL_START_TOKENS)
                        for _ in range(s.num_layers)] if prefill else []

    # -- the transformers Cache surface used by the supported models and their masks ----------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        if self.phase == "prefill":
            self.prefill[layer_idx].append(key_states, value_states)
        else:
            self.state.tail.write(layer_idx, self.state.step.slots, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefill[layer_idx].n if self.phase == "prefill" else self.state.seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:  # noqa: ANN001 (int, or a tensor of positions in older releases)
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.get_seq_length(layer_idx) + q, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def __len__(self) -> int:
        return self.state.num_layers

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.state.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.state.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.state.num_layers

    # -- prefill -> decode ----------------------------------------------------------------------

    def stream_mid(self, total: int) -> None:
        """Write mid-region rows to the tier while the prefill of ``total`` tokens runs
        (:meth:`offload_ready` between chunks), so that a slow tier's writes overlap the next chunks'
        compute instead of following the whole forward; :meth:`finalize_prefill` then writes none."""
        self._stream = (total, self._mid_span(total).start)

    def offload_ready(self, last: bool = False) -> None:
        """Between prefill chunks: append every layer's rows that are final and belong to the
        mid-region (past the sink, before the tail) and were not written yet, in multiples of the
        tier's ``append_unit`` (whole chunk files of a disk store) unless ``last``."""
        if self._stream is None:
            return
        total, start = self._stream
        stop = min(self.prefill[0].n, self._mid_span(total).stop)
        if not last:
            unit = getattr(self.state.tier, "append_unit", 1)
            stop = start + (stop - start) // unit * unit
        if stop <= start:
            return
        positions = torch.arange(start, stop)
        for layer, buf in enumerate(self.prefill):
            k, v = buf.view()
            self.state.tier.append(layer, k[0, :, start:stop], v[0, :, start:stop], positions)
        self._stream = (total, stop)

    def _mid_span(self, n: int) -> slice:
        """The mid-region of a prefill of ``n`` tokens: past the sink, before the tail."""
        cfg = self.state.config
        sink = min(cfg.sink, n)
        return slice(sink, n - min(cfg.tail, n - sink))

    def finalize_prefill(self, progress: Callable[[int], None] | None = None) -> None:
        """Split every layer's prefill buffer into anchors and mid-region: anchors stay on the
        device, the mid-region goes to the tier and the selection state, and its summary is built.
        Each layer's buffer is freed as soon as it is split."""
        st = self.state
        n = self.prefill[0].n
        mid = self._mid_span(n)
        sink, tail = mid.start, n - mid.stop
        positions = torch.arange(n)
        self.offload_ready(last=True)
        streamed = self._stream is not None  # the mid rows are in the tier already
        if streamed and self._stream[1] != mid.stop:
            raise RuntimeError(f"streamed rows up to {self._stream[1]}, the mid-region ends at {mid.stop}")
        st.reserve(n - sink - tail + PLAN_HORIZON)  # and room for a captured plan's spills
        tails_k, tails_v = [], []
        for layer, buf in enumerate(self.prefill):
            k, v = buf.view()
            st.set_anchors(layer, k[:, :, :sink], v[:, :, :sink])
            tails_k.append(k[:, :, n - tail :].clone())
            tails_v.append(v[:, :, n - tail :].clone())
            st.build_summary(layer, k[:, :, mid])
            st.add_mid(layer, k[:, :, mid], v[:, :, mid], positions[mid], in_tier=streamed)
            self.prefill[layer] = None
            if progress is not None:
                progress(layer)
        st.tail.append(torch.stack(tails_k), torch.stack(tails_v), positions[n - tail :])
        st.seen = n
        self.prefill = []
        self.phase = "decode"
        st.refresh()

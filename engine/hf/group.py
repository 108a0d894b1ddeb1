"""Several documents decoded in one forward (``Engine.generate_many``): a transformers Cache over
their caches.

A step's tokens are laid out document by document, ``spans[i] = (a, b)``: tokens ``a..b-1`` belong
to document ``i``.  Each layer writes each document's new keys and values into that document's tail,
and attends each document's queries to that document's state alone (integration.py routes them);
the rest of the model (embeddings, projections, MLPs, the head) runs once over all the tokens, so
the weights are read once per step for every document in it.

On CUDA each document's attention runs on a side stream of its own (:data:`STREAMS`), forked from
the step's stream and joined back in every layer: the documents' selection and attention kernels,
small grids each, run side by side (a captured step records them as parallel branches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..decode.layer import decode_attention
from .cache import RCCache

# The documents' attention on side streams, one per document (the benchmarks switch it off to time both).
STREAMS = True


class GroupCache(RCCache):
    """``members``: the documents' caches, each past its prefill.  :attr:`spans` is set per step."""

    def __init__(self, members: Sequence[RCCache]) -> None:  # noqa: D107 (RCCache's set-up is the members')
        super().__init__(members[0].state, prefill=False)
        self.members = list(members)
        self.spans: list[tuple[int, int]] = []
        self.phase = "group"
        self._streams: list[torch.cuda.Stream] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        """``key_states, value_states: (1, Hkv, T, d)``, each document's span to its own tail."""
        for cache, (a, b) in zip(self.members, self.spans):
            cache.update(key_states[:, :, a:b], value_states[:, :, a:b], layer_idx)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(cache.state.seen for cache in self.members)

    def attention(self, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        """``query (1, Hq, T, d)`` of every document's span -> ``(1, T, Hq, d)``: each span attends
        to its own document's state (on side streams on CUDA)."""
        pairs = list(zip(self.members, self.spans))
        if not (STREAMS and query.is_cuda and len(pairs) > 1):
            return torch.cat([decode_attention(c.state, layer, query[:, :, a:b], scale) for c, (a, b) in pairs], dim=1)
        main = torch.cuda.current_stream(query.device)
        while len(self._streams) < len(pairs):
            self._streams.append(torch.cuda.Stream(query.device))
        parts = []
        for (cache, (a, b)), side in zip(pairs, self._streams):
            side.wait_stream(main)  # after this layer's tail writes and projections
            with torch.cuda.stream(side):
                parts.append(decode_attention(cache.state, layer, query[:, :, a:b], scale))
        for side in self._streams[: len(pairs)]:
            main.wait_stream(side)
        # (each part's memory returns to its side stream, whose next work waits on this stream first)
        return torch.cat(parts, dim=1)

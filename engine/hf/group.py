"""Several documents decoded in one forward (``Engine.generate_many``): a transformers Cache over
their caches.

A step's tokens are laid out document by document, ``spans[i] = (a, b)``: tokens ``a..b-1`` belong
to document ``i``.  Each layer writes each document's new keys and values into that document's tail,
and attends each document's queries to that document's state alone (integration.py routes them);
the rest of the model (embeddings, projections, MLPs, the head) runs once over all the tokens, so
the weights are read once per step for every document in it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache import RCCache


class GroupCache(RCCache):
    """``members``: the documents' caches, each past its prefill.  :attr:`spans` is set per step."""

    def __init__(self, members: Sequence[RCCache]) -> None:  # noqa: D107 (RCCache's set-up is the members')
        super().__init__(members[0].state, prefill=False)
        self.members = list(members)
        self.spans: list[tuple[int, int]] = []
        self.phase = "group"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        """``key_states, value_states: (1, Hkv, T, d)``, each document's span to its own tail."""
        for cache, (a, b) in zip(self.members, self.spans):
            cache.update(key_states[:, :, a:b], value_states[:, :, a:b], layer_idx)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(cache.state.seen for cache in self.members)

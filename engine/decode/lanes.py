"""Several sequences ("lanes") decoded together over one document's state.

Batched questions share everything the document holds (sink, mid-region, selection state,
summaries, the tail as it was after the prefill); each adds its own tokens to the tail, in a
segment of slots of its own.  A step of the batch is one forward over one token per lane (or every
question token at first): the tail marks each new slot with its lane (``TailRing.lane``), a query
sees the document's slots and its own lane's only, and the rows the lanes' queries select from the
mid-region are read once for all of them (:func:`~.layer.read_mid`).

:class:`Lanes` hands out the slots; the batch owns them until the tail is truncated after it.

Captured steps (CUDA graphs) have one shape per batch-size bucket (:func:`bucket`: powers of two):
a step with fewer answers going is padded with copies of its first token in lane :data:`PAD_LANE`,
written to pad slots no answer sees, selecting what that first token selects (so they add nothing
to the rows read), their logits dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tail import TailRing

# The lane of padding tokens: distinct from every answer's (0..B-1) and not negative (the document's).
PAD_LANE = 1 << 30


def bucket(count: int) -> int:
    """Queries of a captured step of ``count`` answers: the next power of two."""
    return 1 << (count - 1).bit_length()


class Lanes:
    """Tail segments of ``sizes[b]`` slots for lanes ``b = 0..B-1``, and ``pad`` slots for padding
    tokens, after the tokens the tail holds now (reserve room first).  The slots are held
    (``tail.n`` covers them) until the caller truncates the tail back."""

    def __init__(self, tail: TailRing, sizes: Sequence[int], pad: int = 0) -> None:
        total = sum(sizes) + pad
        if tail.n + total > tail.capacity:
            raise RuntimeError(f"the tail holds {tail.n} of {tail.capacity} tokens: reserve room for {total} more first")
        first = tail.start + tail.n
        self._capacity = tail.capacity
        self._base: list[int] = []
        for size in sizes:
            self._base.append(first)
            first += size
        self._pad = [(first + i) % tail.capacity for i in range(pad)]
        self._size = list(sizes)
        self._used = [0] * len(sizes)
        tail.n += total

    def __len__(self) -> int:
        return len(self._size)

    def take(self, lane: int, count: int) -> list[int]:
        """The next ``count`` slots of ``lane``."""
        used = self._used[lane]
        if used + count > self._size[lane]:
            raise RuntimeError(f"lane {lane} holds {self._size[lane]} tail slots; {used + count} were asked for")
        self._used[lane] = used + count
        return [(self._base[lane] + used + i) % self._capacity for i in range(count)]

    def pad_slots(self, count: int) -> list[int]:
        """``count`` slots for padding tokens (the same ones every step: nothing reads them)."""
        if count > len(self._pad):
            raise RuntimeError(f"{len(self._pad)} pad slots are held; {count} were asked for")
        return self._pad[:count]

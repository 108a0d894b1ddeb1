"""The methods: which parts of the rule a decode query uses, one small class each.

- ``dense``: every mid token, read from the tier (the read-everything baseline);
- ``sink-tail``: the anchors only;
- ``topk``: the anchors and the Top-K retrieved mid tokens, renormalised;
- ``rc``: Top-K plus the summary's estimate of the unread mid tokens (retrieval-completion).

Each says how many mid tokens a query reads per KV head (``count``), whether they are chosen by a
selector (``selects``) and whether the summary completes the rest (``completes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .budget import retrieval_count

Method = Literal["dense", "sink-tail", "topk", "rc"]
METHODS: tuple[str, ...] = ("dense", "sink-tail", "topk", "rc")


@dataclass(frozen=True, slots=True)
class Dense:
    name: ClassVar[str] = "dense"
    selects: ClassVar[bool] = False
    completes: ClassVar[bool] = False

    def count(self, budget: float, mid_len: int) -> int:
        return mid_len


@dataclass(frozen=True, slots=True)
class SinkTail:
    name: ClassVar[str] = "sink-tail"
    selects: ClassVar[bool] = False
    completes: ClassVar[bool] = False

    def count(self, budget: float, mid_len: int) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class TopK:
    name: ClassVar[str] = "topk"
    selects: ClassVar[bool] = True
    completes: ClassVar[bool] = False

    def count(self, budget: float, mid_len: int) -> int:
        return retrieval_count(budget, mid_len)


@dataclass(frozen=True, slots=True)
class RetrievalCompletion(TopK):
    name: ClassVar[str] = "rc"
    completes: ClassVar[bool] = True


MethodRule = Dense | SinkTail | TopK | RetrievalCompletion
_BY_NAME: dict[str, type] = {cls.name: cls for cls in (Dense, SinkTail, TopK, RetrievalCompletion)}


def method_rule(name: str) -> MethodRule:
    """The method called ``name``."""
    if name not in _BY_NAME:
        raise ValueError(f"method {name!r} is unknown: use one of {', '.join(METHODS)}")
    return _BY_NAME[name]()

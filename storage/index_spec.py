"""What kind of key index to build (FAISS is imported only where an index is built)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IndexKind = Literal["flat", "ivf", "hnsw"]


@dataclass(frozen=True, slots=True)
class IndexSpec:
    kind: IndexKind = "flat"
    nlist: int = 256
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 80

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"index kind {self.kind!r} is unknown: use flat, ivf or hnsw")
        if min(self.nlist, self.nprobe, self.hnsw_m, self.ef_search, self.ef_construction) < 1:
            raise ValueError(f"index parameters must be positive: {self}")

"""The key index: one FAISS inner-product index per (layer, KV head).

A search takes the G queries of a KV-head group and returns one merged set of K row ids, ranked by
the largest score any query of the group gives a row.  The merge is exact for exact per-query
search: a row of the group's true Top-K is in the Top-K of the query that scores it highest.

Kinds: ``flat`` (exact, the default), ``ivf`` (nlist lists, nprobe searched; trained on the rows
added before the first search), ``hnsw`` (M links, ef_search).  Row ids are the order rows were
added, the same as the storage tiers' row ids.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from .index_spec import IndexSpec
from .meter import ByteMeter

# FAISS wants at least 39 training points per IVF list; fewer lists are used for short contexts.
_IVF_POINTS_PER_LIST = 39


class StreamedFlatIndex:
    """Exact inner-product search over keys kept in a file, read block by block at every search.

    Holds no key in memory but rows added later (tokens spilled after reopening).  ``reader``
    gives verified blocks of float32 rows (``num_blocks``, ``read(i) -> bytes``).  Mimics the FAISS
    calls KeyIndex makes (``ntotal``, ``add``, ``search``)."""

    def __init__(self, reader, rows: int, dim: int) -> None:  # noqa: ANN001 (storage.artifact.BlockReader or alike)
        self.reader, self.rows, self.d = reader, rows, dim
        self._extra: list[np.ndarray] = []

    @property
    def ntotal(self) -> int:
        return self.rows + sum(x.shape[0] for x in self._extra)

    def add(self, rows: np.ndarray) -> None:
        self._extra.append(np.array(rows, dtype=np.float32, copy=True))

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``q: (G, d)`` -> scores and ids ``(G, k)``, best first (ids -1 past the rows there are)."""
        g = q.shape[0]
        best_s = np.empty((g, 0), np.float32)
        best_i = np.empty((g, 0), np.int64)
        offset = 0

        def merge(x: np.ndarray) -> None:
            nonlocal best_s, best_i, offset
            cand_s = np.concatenate([best_s, q @ x.T], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(offset, offset + x.shape[0]), (g, x.shape[0]))], axis=1)
            if cand_s.shape[1] > k:
                keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
                cand_s, cand_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
            best_s, best_i = cand_s, cand_i
            offset += x.shape[0]

        for block in range(self.reader.num_blocks):
            merge(np.frombuffer(self.reader.read(block), dtype=np.float32).reshape(-1, self.d))
        for x in self._extra:
            merge(x)
        order = np.argsort(-best_s, axis=1, kind="stable")
        scores, ids = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.concatenate([scores, np.full((g, pad), -np.inf, np.float32)], axis=1)
            ids = np.concatenate([ids, np.full((g, pad), -1, np.int64)], axis=1)
        return scores, ids


class KeyIndex:
    """Indexes for every (layer, KV head) of one sequence."""

    def __init__(self, spec: IndexSpec, num_layers: int, num_kv_heads: int, head_dim: int, meter: ByteMeter | None = None) -> None:
        self.spec = spec
        self.head_dim = head_dim
        self.meter = meter if meter is not None else ByteMeter()
        self._indexes = [[self._new() for _ in range(num_kv_heads)] for _ in range(num_layers)]
        # IVF rows added before training, per (layer, head).
        self._untrained: list[list[list[np.ndarray]]] = [[[] for _ in range(num_kv_heads)] for _ in range(num_layers)]

    def _new(self) -> faiss.Index:
        d = self.head_dim
        if self.spec.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.spec.ef_construction
            return index
        return faiss.IndexFlatIP(d)  # ivf: replaced by a trained IVF index before first search

    @property
    def num_layers(self) -> int:
        return len(self._indexes)

    @property
    def num_kv_heads(self) -> int:
        return len(self._indexes[0])

    def num_rows(self, layer: int, head: int = 0) -> int:
        pending = sum(x.shape[0] for x in self._untrained[layer][head])
        return self._indexes[layer][head].ntotal + pending

    def add(self, layer: int, keys: torch.Tensor) -> None:
        """Append rows: ``keys: (Hkv, n, d)`` (any float dtype; searched in float32)."""
        if keys.shape[0] != self.num_kv_heads or keys.shape[-1] != self.head_dim:
            raise ValueError(f"keys of shape {tuple(keys.shape)} do not fit {self.num_kv_heads} KV heads of dim {self.head_dim}")
        x = keys.detach().to("cpu", torch.float32).numpy()
        for head in range(self.num_kv_heads):
            rows = np.ascontiguousarray(x[head])
            if self.spec.kind == "ivf" and not self._is_trained(layer, head):
                self._untrained[layer][head].append(rows)
            else:
                self._indexes[layer][head].add(rows)

    def _is_trained(self, layer: int, head: int) -> bool:
        return isinstance(self._indexes[layer][head], faiss.IndexIVFFlat)

    def _train(self, layer: int, head: int) -> None:
        parts = self._untrained[layer][head]
        rows = np.concatenate(parts) if parts else np.zeros((0, self.head_dim), np.float32)
        nlist = max(1, min(self.spec.nlist, rows.shape[0] // _IVF_POINTS_PER_LIST))
        quantizer = faiss.IndexFlatIP(self.head_dim)
        index = faiss.IndexIVFFlat(quantizer, self.head_dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if rows.shape[0]:
            index.train(rows)
            index.add(rows)
        else:
            index.train(np.zeros((1, self.head_dim), np.float32))
        index.nprobe = min(self.spec.nprobe, nlist)
        self._indexes[layer][head] = index
        self._untrained[layer][head] = []

    def search(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries: (Hkv, G, d)`` -> ``ids: (Hkv, k)`` int64 and ``valid: (Hkv, k)`` bool.

        Ids are best first; where fewer than ``k`` rows were found the rest are 0 and invalid."""
        ids, valid = self.search_rows(layer, queries[:, None], k)
        return ids[:, 0], valid[:, 0]

    def search_rows(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries: (Hkv, T, G, d)``: T query positions, each a group of G -> ``ids, valid:
        (Hkv, T, k)``, each position's own merged set.  One FAISS search per KV head serves all
        T G queries (a flat index reads its keys once for them)."""
        q = queries.detach().to("cpu", torch.float32).numpy()
        h, t, g, d = q.shape
        ids = np.zeros((h, t, k), np.int64)
        valid = np.zeros((h, t, k), bool)
        if k == 0:
            return torch.from_numpy(ids), torch.from_numpy(valid)
        for head in range(h):
            if self.spec.kind == "ivf" and not self._is_trained(layer, head):
                self._train(layer, head)
            index = self._indexes[layer][head]
            if index.ntotal == 0:
                continue
            kk = min(k, index.ntotal)
            scores, found, vectors = self._search(index, np.ascontiguousarray(q[head].reshape(t * g, d)), kk)
            ids[head], valid[head] = merge_group_rows(scores.reshape(t, g * kk), found.reshape(t, g * kk), k)
            where = "disk" if isinstance(index, StreamedFlatIndex) else "cpu"  # streamed keys come from the store
            self.meter.record_index(layer, vectors * self.head_dim * 4, vectors, tier=where)
        return torch.from_numpy(ids), torch.from_numpy(valid)

    def nbytes(self, layer: int) -> int:
        """Host memory the layer's indexes hold for their vectors (keys streamed from a file: 0)."""
        return sum(getattr(index, "ntotal", 0) * self.head_dim * 4 for index in self._indexes[layer]
                   if not isinstance(index, StreamedFlatIndex))

    def _search(self, index: faiss.Index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Scores and ids ``(G, k)``, and the number of key vectors touched (FAISS's counters)."""
        if isinstance(index, faiss.IndexIVFFlat):
            faiss.cvar.indexIVF_stats.reset()
            scores, found = index.search(q, k)
            return scores, found, int(faiss.cvar.indexIVF_stats.ndis) + q.shape[0] * index.nlist
        if isinstance(index, faiss.IndexHNSWFlat):
            index.hnsw.efSearch = max(self.spec.ef_search, k)
            faiss.cvar.hnsw_stats.reset()
            scores, found = index.search(q, k)
            return scores, found, int(faiss.cvar.hnsw_stats.ndis)
        scores, found = index.search(q, k)  # flat, resident or streamed
        return scores, found, index.ntotal  # a flat search reads every key once for the group

    # -- persistence --------------------------------------------------------------------------

    def keys(self, layer: int, head: int) -> np.ndarray:
        """A flat index's keys, ``(n, d)`` float32 (for persisting them as a plain file)."""
        index = self._indexes[layer][head]
        if not isinstance(index, faiss.IndexFlat):
            raise TypeError(f"only flat indexes hold their keys plainly, not {type(index).__name__}")
        return index.reconstruct_n(0, index.ntotal)

    def load_keys(self, layer: int, head: int, keys: np.ndarray) -> None:
        """A resident flat index over ``keys: (n, d)`` float32."""
        index = faiss.IndexFlatIP(self.head_dim)
        index.add(np.ascontiguousarray(keys, dtype=np.float32))
        self._indexes[layer][head] = index
        self._untrained[layer][head] = []

    def attach_streamed(self, layer: int, head: int, reader, rows: int) -> None:  # noqa: ANN001
        """A flat index whose keys stay in a file (see :class:`StreamedFlatIndex`)."""
        self._indexes[layer][head] = StreamedFlatIndex(reader, rows, self.head_dim)
        self._untrained[layer][head] = []

    def serialize(self, layer: int, head: int) -> bytes:
        if self.spec.kind == "ivf" and not self._is_trained(layer, head):
            self._train(layer, head)
        return faiss.serialize_index(self._indexes[layer][head]).tobytes()

    def load(self, layer: int, head: int, data: bytes) -> None:
        """Replace one index by a serialised one (its bytes must come from a verified source)."""
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != self.head_dim:
            raise ValueError(f"serialised index has dim {index.d}, expected {self.head_dim}")
        if isinstance(index, faiss.IndexIVFFlat):
            index.nprobe = min(self.spec.nprobe, index.nlist)
        self._indexes[layer][head] = index
        self._untrained[layer][head] = []


def merge_group(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """``scores, ids: (G, k')`` per-query results (-1 = none) -> up to ``k`` distinct ids ranked
    by their best score over the group, best first."""
    merged, valid = merge_group_rows(scores.reshape(1, -1), ids.reshape(1, -1), k)
    return merged[0, valid[0]]


def merge_group_rows(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``scores, ids: (T, C)`` holds one query position's candidates (its group's
    per-query results side by side; id -1 = none) -> ``ids, valid: (T, k)``: per row up to ``k``
    distinct ids ranked by their best score, best first; unfilled places are 0 and invalid."""
    t, c = ids.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, 1)
    # The first occurrence of an id in its row (rows sorted by score) is its best score.
    key = np.arange(t)[:, None] * (int(sorted_ids.max(initial=0)) + 2) + (sorted_ids + 1)
    _, first = np.unique(key.reshape(-1), return_index=True)
    keep = np.zeros(t * c, bool)
    keep[first] = True
    keep = keep.reshape(t, c) & (sorted_ids >= 0)
    rank = np.cumsum(keep, axis=1) - 1
    rows, cols = np.nonzero(keep & (rank < k))
    out = np.zeros((t, k), np.int64)
    valid = np.zeros((t, k), bool)
    out[rows, rank[rows, cols]] = sorted_ids[rows, cols]
    valid[rows, rank[rows, cols]] = True
    return out, valid

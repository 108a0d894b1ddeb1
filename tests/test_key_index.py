"""Key indexes against exact search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcengine.engine import group_topk
from rcengine.storage import ByteMeter, IndexSpec, KeyIndex, merge_group

H, G, D = 2, 4, 16


def _data(gen, n):
    k = torch.randn(H, n, D, generator=gen) + torch.randn(H, 1, D, generator=gen)
    q = torch.randn(H, G, D, generator=gen)
    return k, q


def test_flat_equals_exact_group_topk(gen):
    k, q = _data(gen, 3000)
    index = KeyIndex(IndexSpec("flat"), 1, H, D)
    index.add(0, k[:, :1000])
    index.add(0, k[:, 1000:])  # incremental add continues the row ids
    for count in (1, 30, 300):
        ids, valid = index.search(0, q, count)
        assert valid.all()
        ref = group_topk(q[None], k[None], count)[0]
        for h in range(H):
            assert set(ids[h].tolist()) == set(ref[h].tolist())
            assert ids[h, 0] == ref[h, 0]  # best first


def test_more_than_available_is_padded_invalid(gen):
    k, q = _data(gen, 10)
    index = KeyIndex(IndexSpec("flat"), 1, H, D)
    index.add(0, k)
    ids, valid = index.search(0, q, 25)
    assert valid.sum(dim=1).tolist() == [10, 10]
    assert (ids[~valid] == 0).all()
    assert sorted(ids[0, :10].tolist()) == list(range(10))
    empty = KeyIndex(IndexSpec("flat"), 1, H, D)
    ids, valid = empty.search(0, q, 5)
    assert not valid.any()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes(gen, kind):
    k, _ = _data(gen, 4000)
    spec = IndexSpec(kind, nlist=16, nprobe=16, ef_search=1000)  # nprobe = nlist: IVF is exhaustive
    index = KeyIndex(spec, 1, H, D)
    index.add(0, k[:, :2500])
    index.add(0, k[:, 2500:])
    recalls = []
    for _ in range(8):
        q = torch.randn(H, G, D, generator=gen)
        ids, valid = index.search(0, q, 50)
        ref = group_topk(q[None], k[None], 50)[0]
        for h in range(H):
            got = ids[h][valid[h]].tolist()
            assert len(set(got)) == len(got) and all(0 <= i < 4000 for i in got)
            recalls.append(len(set(got) & set(ref[h].tolist())) / 50)
    if kind == "ivf":
        assert min(recalls) == 1.0
    else:  # greedy graph search under inner product (not a metric): mean ~0.9, seeds vary
        assert sum(recalls) / len(recalls) >= 0.6, recalls


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_serialise_round_trip(gen, kind):
    k, q = _data(gen, 2000)
    a = KeyIndex(IndexSpec(kind, nlist=8, nprobe=2), 1, H, D)
    a.add(0, k)
    ids_a, _ = a.search(0, q, 20)
    b = KeyIndex(IndexSpec(kind, nlist=8, nprobe=2), 1, H, D)
    for h in range(H):
        b.load(0, h, a.serialize(0, h))
    ids_b, _ = b.search(0, q, 20)
    assert torch.equal(ids_a, ids_b)
    assert b.num_rows(0, 1) == 2000


def test_selection_cost_is_metered(gen):
    k, q = _data(gen, 1234)
    meter = ByteMeter()
    index = KeyIndex(IndexSpec("flat"), 2, H, D, meter)
    index.add(1, k)
    index.search(1, q, 10)
    assert meter.index_totals(layer=1).bytes == H * 1234 * D * 4  # a flat search reads every key
    assert meter.index_totals().searches == H
    ivf = KeyIndex(IndexSpec("ivf", nlist=16, nprobe=2), 1, H, D, meter)
    ivf.add(0, k)
    ivf.search(0, q, 10)
    touched = meter.index_totals(layer=0).vectors
    assert 0 < touched < H * G * 1234  # probes 2 of 16 lists per query, plus the 16 centroids


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 15), st.integers(0, 2**31 - 1))
def test_merge_group_ranks_by_best_score(g, kprime, k, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, 20, size=(g, kprime))
    scores = rng.standard_normal((g, kprime)).astype(np.float32)
    merged = merge_group(scores, ids, k)
    best: dict[int, float] = {}
    for s, i in zip(scores.ravel(), ids.ravel(), strict=True):
        if i >= 0:
            best[int(i)] = max(best.get(int(i), -np.inf), float(s))
    expected = sorted(best, key=lambda i: -best[i])[:k]
    assert [best[i] for i in merged.tolist()] == [best[i] for i in expected]
    assert set(merged.tolist()) <= set(best)
    assert len(set(merged.tolist())) == len(merged)


def test_bad_spec_and_keys():
    with pytest.raises(ValueError, match="unknown"):
        IndexSpec("lsh")
    with pytest.raises(ValueError, match="positive"):
        IndexSpec("ivf", nprobe=0)
    with pytest.raises(ValueError, match="do not fit"):
        KeyIndex(IndexSpec(), 1, H, D).add(0, torch.zeros(3, 5, D))


class _Blocks:
    """An in-memory stand-in for an artifact's block reader."""

    def __init__(self, keys: np.ndarray, rows: int) -> None:
        data = np.ascontiguousarray(keys, dtype=np.float32).tobytes()
        step = rows * keys.shape[1] * 4
        self.blocks = [data[i : i + step] for i in range(0, len(data), step)]
        self.reads = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def read(self, i: int) -> bytes:
        self.reads += 1
        return self.blocks[i]


def test_streamed_flat_equals_resident_flat(gen):
    k, _ = _data(gen, 2500)
    extra, _ = _data(gen, 300)
    resident = KeyIndex(IndexSpec("flat"), 1, H, D)
    resident.add(0, k)
    resident.add(0, extra)
    streamed = KeyIndex(IndexSpec("flat"), 1, H, D)
    readers = []
    for h in range(H):
        readers.append(_Blocks(resident.keys(0, h)[:2500], rows=700))  # 4 blocks, the last partial
        streamed.attach_streamed(0, h, readers[-1], 2500)
    streamed.add(0, extra)  # rows added after reopening stay in memory
    assert streamed.num_rows(0, 1) == 2800
    for count in (1, 40, 3000):
        q = torch.randn(H, G, D, generator=gen)
        ids_r, valid_r = resident.search(0, q, count)
        ids_s, valid_s = streamed.search(0, q, count)
        assert torch.equal(valid_r, valid_s)
        for h in range(H):
            assert set(ids_r[h][valid_r[h]].tolist()) == set(ids_s[h][valid_s[h]].tolist())
    assert all(r.reads == 3 * 4 for r in readers)  # every search reads every block once

"""One contract for every tier: exact gathers, appends, positions, and exact meter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcengine.storage import ByteMeter, DiskTier, TierLayout, device_tier, host_tier

LAYOUT = TierLayout(num_layers=2, num_kv_heads=3, head_dim=8, dtype=torch.bfloat16)
BLOCK = 16
CHUNK = 32


def _make(kind, tmp_path, meter):
    if kind == "device":
        return device_tier(LAYOUT, "cpu", meter)
    if kind == "cpu":
        return host_tier(LAYOUT, "cpu", meter)
    # Disk stores of two blocks per chunk file (every head in it), and of a block of one head per file.
    if kind == "disk":
        return DiskTier.create(tmp_path / "kv.zarr", LAYOUT, block_tokens=BLOCK, cache_bytes=1 << 20, meter=meter, chunk_tokens=CHUNK)
    if kind == "disk-head-files":
        return DiskTier.create(tmp_path / "kv.zarr", LAYOUT, block_tokens=BLOCK, cache_bytes=1 << 20, meter=meter, chunk_tokens=BLOCK,
                               chunk_heads=1)
    if kind == "disk-nocache":
        return DiskTier.create(tmp_path / "kv.zarr", LAYOUT, block_tokens=BLOCK, cache_bytes=0, meter=meter, chunk_tokens=CHUNK)
    if kind == "disk-url":
        return DiskTier.create(f"memory://{tmp_path.name}/kv.zarr", LAYOUT, block_tokens=BLOCK, meter=meter, chunk_tokens=CHUNK)
    raise AssertionError(kind)


TIERS = ["device", "cpu", "disk", "disk-head-files", "disk-nocache", "disk-url"]


def _fill(tier, gen, sizes=(37, 5, 64, 1, 23)):
    """Append chunks to every layer; return the reference rows ``(L, Hkv, n, 2, d)``."""
    refs = []
    for layer in range(LAYOUT.num_layers):
        ks, vs = [], []
        pos = 0
        for n in sizes:
            k = torch.randn(3, n, 8, generator=gen).to(torch.bfloat16)
            v = torch.randn(3, n, 8, generator=gen).to(torch.bfloat16)
            tier.append(layer, k, v, torch.arange(pos, pos + n) * 2 + layer)
            pos += n
            ks.append(k)
            vs.append(v)
        refs.append(torch.stack([torch.cat(ks, 1), torch.cat(vs, 1)], dim=2))
    return refs


def _bits(t):
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("kind", TIERS)
def test_gather_is_exact_and_ordered(kind, tmp_path, gen):
    tier = _make(kind, tmp_path, ByteMeter())
    refs = _fill(tier, gen)
    n = sum((37, 5, 64, 1, 23))
    for layer in range(2):
        assert tier.num_rows(layer) == n
        np.testing.assert_array_equal(tier.positions(layer), np.arange(n) * 2 + layer)
        ids = torch.randint(0, n, (3, 40), generator=gen)  # duplicates and any order
        ids[0, :3] = torch.tensor([n - 1, 0, n - 1])
        k, v = tier.gather(layer, ids)
        assert k.shape == v.shape == (3, 40, 8) and k.dtype == torch.bfloat16
        for h in range(3):
            assert torch.equal(_bits(k[h]), _bits(refs[layer][h, ids[h], 0]))
            assert torch.equal(_bits(v[h]), _bits(refs[layer][h, ids[h], 1]))
    tier.close()


@pytest.mark.parametrize("kind", ["device", "cpu"])
def test_memory_tier_meter_is_exact(kind, tmp_path, gen):
    meter = ByteMeter()
    tier = _make(kind, tmp_path, meter)
    _fill(tier, gen)
    tier.gather(1, torch.randint(0, 100, (3, 7), generator=gen))
    meter.next_step()
    tier.gather(0, torch.randint(0, 100, (3, 5), generator=gen))
    rb = 2 * 8 * 2
    assert meter.totals(tier=kind, step=0).logical == 3 * 7 * rb
    assert meter.totals(tier=kind, layer=0).physical == 3 * 5 * rb
    assert meter.totals().rows == 3 * 12
    s = meter.summary()
    assert s["by_tier"][kind]["logical"] == 3 * 12 * rb
    assert [p["step"] for p in s["per_step"]] == [0, 1]


def test_disk_meter_counts_whole_blocks_and_cache_hits(tmp_path, gen):
    meter = ByteMeter()
    tier = _make("disk", tmp_path, meter)
    _fill(tier, gen, sizes=(100,))  # 6 whole blocks of 16 in the store, 4 rows pending in memory
    block_bytes = BLOCK * 2 * 8 * 2
    ids = torch.tensor([[0, 1, 17, 97], [40, 40, 41, 99], [95, 3, 20, 60]])
    tier.gather(0, ids)
    # Distinct (head, block) pairs read: h0 {0, 1}, h1 {2}, h2 {5, 0, 1, 3} -> 7 blocks.
    disk = meter.totals(tier="disk")
    assert (disk.cache_misses, disk.cache_hits) == (7, 0)
    assert disk.physical == 7 * block_bytes
    assert disk.logical == 10 * 32  # rows 97 and 99 are past the last whole block (96)
    assert meter.totals(tier="cpu").logical == 2 * 32
    meter.next_step()
    tier.gather(0, ids)
    again = meter.totals(tier="disk", step=1)
    assert (again.cache_misses, again.cache_hits, again.physical) == (0, 7, 0)


def test_disk_cache_stays_in_bound(tmp_path, gen):
    block_bytes = BLOCK * 2 * 8 * 2
    tier = DiskTier.create(tmp_path / "kv.zarr", LAYOUT, block_tokens=BLOCK, cache_bytes=3 * block_bytes, chunk_tokens=CHUNK)
    refs = _fill(tier, gen, sizes=(160,))
    for _ in range(10):
        ids = torch.randint(0, 160, (3, 6), generator=gen)
        k, _ = tier.gather(1, ids)
        assert tier.cache.nbytes <= 3 * block_bytes
        assert torch.equal(_bits(k[2]), _bits(refs[1][2, ids[2], 0]))
    assert tier.cache.peak_bytes <= 3 * block_bytes


def test_disk_reopen_and_append_to_read_only(tmp_path, gen):
    meter = ByteMeter()
    tier = _make("disk", tmp_path, meter)
    refs = _fill(tier, gen)
    tier.flush()
    checksums = tier.checksums
    tier.close()
    again = DiskTier.open(tmp_path / "kv.zarr", checksums=checksums, meter=meter)
    n = again.num_rows(0)
    assert n == 130
    ids = torch.arange(n).repeat(3, 1)
    k, v = again.gather(0, ids)
    assert torch.equal(_bits(k), _bits(refs[0][:, :, 0]))
    # A reopened store is never modified: new rows stay in memory and are served from there.
    extra_k = torch.randn(3, 20, 8, generator=gen).to(torch.bfloat16)
    again.append(0, extra_k, extra_k, torch.arange(20))
    k2, _ = again.gather(0, torch.tensor([[n + 19], [n], [1]]))
    assert torch.equal(_bits(k2[0, 0]), _bits(extra_k[0, 19]))
    with pytest.raises(PermissionError):
        again.flush()
    assert DiskTier.open(tmp_path / "kv.zarr", checksums=checksums).num_rows(0) == 130


def test_disk_flush_then_more_rows(tmp_path, gen):
    """Flushing a partial block and appending more rewrites that block correctly."""
    tier = _make("disk", tmp_path, ByteMeter())
    ka = torch.randn(3, 10, 8, generator=gen).to(torch.bfloat16)
    kb = torch.randn(3, 30, 8, generator=gen).to(torch.bfloat16)
    for layer in range(2):
        tier.append(layer, ka, ka, torch.arange(10))
    tier.flush()
    for layer in range(2):
        tier.append(layer, kb, kb, torch.arange(10, 40))
    tier.flush()
    reopened = DiskTier.open(tmp_path / "kv.zarr", checksums=tier.checksums)
    k, _ = reopened.gather(1, torch.arange(40).repeat(3, 1))
    assert torch.equal(_bits(k), _bits(torch.cat([ka, kb], 1)))


@pytest.mark.parametrize("kind", TIERS)
def test_bad_input_is_refused(kind, tmp_path, gen):
    tier = _make(kind, tmp_path, ByteMeter())
    with pytest.raises(ValueError, match="layout"):
        tier.append(0, torch.zeros(2, 4, 8, dtype=torch.bfloat16), torch.zeros(2, 4, 8, dtype=torch.bfloat16), torch.arange(4))
    with pytest.raises(ValueError, match="positions"):
        tier.append(0, torch.zeros(3, 4, 8, dtype=torch.bfloat16), torch.zeros(3, 4, 8, dtype=torch.bfloat16), torch.arange(3))
    with pytest.raises(IndexError):
        tier.append(5, torch.zeros(3, 4, 8, dtype=torch.bfloat16), torch.zeros(3, 4, 8, dtype=torch.bfloat16), torch.arange(4))


def test_disk_refuses_out_of_range_ids_and_existing_store(tmp_path, gen):
    tier = _make("disk", tmp_path, ByteMeter())
    _fill(tier, gen, sizes=(20,))
    with pytest.raises(IndexError, match="row ids"):
        tier.gather(0, torch.tensor([[0], [20], [1]]))
    with pytest.raises(FileExistsError):
        DiskTier.create(tmp_path / "kv.zarr", LAYOUT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes_round_trip(tmp_path, gen, dtype):
    layout = TierLayout(1, 2, 4, dtype)
    tier = DiskTier.create(tmp_path / "kv.zarr", layout, block_tokens=4)
    k = torch.randn(2, 9, 4, generator=gen).to(dtype)
    tier.append(0, k, -k, torch.arange(9))
    tier.flush()
    back = DiskTier.open(tmp_path / "kv.zarr", checksums=tier.checksums)
    kk, vv = back.gather(0, torch.arange(9).repeat(2, 1))
    assert kk.dtype == dtype and torch.equal(kk, k) and torch.equal(vv, -k)


def test_all_zero_blocks_are_stored_and_verified(tmp_path):
    tier = DiskTier.create(tmp_path / "kv.zarr", LAYOUT, block_tokens=BLOCK, chunk_tokens=BLOCK)
    zeros = torch.zeros(3, 40, 8, dtype=torch.bfloat16)
    for layer in range(2):
        tier.append(layer, zeros, zeros, torch.arange(40))
    tier.flush()
    reopened = DiskTier.open(tmp_path / "kv.zarr", checksums=tier.checksums)
    k, v = reopened.gather(0, torch.arange(40).repeat(3, 1))
    assert not k.any() and not v.any()
    assert reopened.meter.totals(tier="disk").cache_misses == 3 * 2  # blocks 0 and 1 of 3 heads


def test_chunks_written_directly_are_what_zarr_reads(tmp_path, gen):
    """A local store's blocks are written by background threads straight to chunk files: zarr's own
    reader (a full read) sees exactly the rows appended, and every chunk has its checksum."""
    import zarr

    tier = _make("disk", tmp_path, ByteMeter())
    refs = _fill(tier, gen)
    tier.flush()
    checksums = tier.checksums
    group = zarr.open_group(str(tmp_path / "kv.zarr"), mode="r")
    for layer, ref in enumerate(refs):
        raw = np.asarray(group[f"L{layer}"][:])  # (Hkv, n, 2, d) raw bits
        assert raw.shape == tuple(ref.shape) and np.array_equal(raw.view(np.int16), _bits(ref).numpy())
        assert int(group[f"L{layer}"].attrs["rows"]) == ref.shape[1]
    chunk_files = [p for p in (tmp_path / "kv.zarr").glob("L*/*") if p.name != "zarr.json"]
    assert chunk_files and all(p.name.startswith("c.") for p in chunk_files)  # one folder per layer
    assert all(str(p.relative_to(tmp_path / "kv.zarr")) in checksums for p in chunk_files)
    tier.close()


def test_stores_with_nested_chunk_folders_still_open(tmp_path, gen, monkeypatch):
    """Stores written before chunk keys were dotted (``L0/c/0/3/0/0``) read back, verified."""
    import rcengine.storage.disk_tier as disk_tier

    monkeypatch.setattr(disk_tier, "CHUNK_KEYS", {"name": "default", "separator": "/"})
    tier = _make("disk", tmp_path, ByteMeter())
    refs = _fill(tier, gen)
    tier.flush()
    assert (tmp_path / "kv.zarr" / "L0" / "c" / "0").is_dir()
    monkeypatch.undo()
    old = DiskTier.open(tmp_path / "kv.zarr", checksums=tier.checksums)
    for layer, ref in enumerate(refs):
        k, v = old.gather(layer, torch.arange(ref.shape[1]).repeat(3, 1))
        assert torch.equal(_bits(k), _bits(ref[:, :, 0])) and torch.equal(_bits(v), _bits(ref[:, :, 1]))


def test_version_1_stores_still_open(tmp_path, gen):
    """A store of format version 1 (a file per block and KV head, no chunk attributes) reads back."""
    import json

    tier = _make("disk-head-files", tmp_path, ByteMeter())
    refs = _fill(tier, gen)
    tier.flush()
    tier.close()
    meta_path = tmp_path / "kv.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    attrs = meta["attributes"]
    attrs["version"] = 1
    del attrs["chunk_tokens"], attrs["chunk_heads"]
    meta_path.write_text(json.dumps(meta))
    old = DiskTier.open(tmp_path / "kv.zarr")
    assert (old.chunk_tokens, old.chunk_heads) == (BLOCK, 1)
    k, v = old.gather(1, torch.arange(130).repeat(3, 1))
    assert torch.equal(_bits(k), _bits(refs[1][:, :, 0])) and torch.equal(_bits(v), _bits(refs[1][:, :, 1]))


def _resident_rows(tier, slots):
    """Rows ``(..., block, 2, d)`` of the cache's slots (what a step reads in place)."""
    return tier.cache.view[slots.clamp(min=0)]


@pytest.mark.parametrize("kind", ["disk", "disk-head-files", "disk-url"])
def test_block_cache_lookups_fills_and_in_place_rows(kind, tmp_path, gen):
    """The device side of the block cache: a deferred lookup flags missing blocks and finds none;
    after ``fill_missed`` every wanted block is resident, and its slot holds exactly the rows a full
    read returns (blocks past the store's whole chunks come from memory)."""
    meter = ByteMeter()
    tier = _make(kind, tmp_path, meter)
    refs = _fill(tier, gen, sizes=(100,))  # 96 rows in whole chunks of 32, 4 in memory (block 6)
    tier.reserve(100)
    pool = tier.cache
    blocks = torch.tensor([[[0, 2, 6], [1, 1, 5], [6, 3, 0]]])  # (T 1, Hkv 3, X 3)
    wanted = torch.tensor([[[True, True, True], [True, False, True], [True, True, False]]])
    pool.deferred = True
    tier.begin_step()
    pool.begin_step()
    slots = tier.resolve(1, blocks, wanted)
    assert (slots == -1).all()
    assert sorted(pool.missed()) == sorted({(1, h, int(b)) for h in range(3) for b, w in zip(blocks[0, h], wanted[0, h]) if w})
    assert tier.fill_missed()
    pool.begin_step()
    slots = tier.resolve(1, blocks, wanted)
    assert ((slots >= 0) == wanted).all() and not tier.fill_missed()
    rows = _resident_rows(tier, slots)  # (1, Hkv, X, block, 2, d)
    for h in range(3):
        for x in range(3):
            if wanted[0, h, x]:
                b = int(blocks[0, h, x])
                ref = refs[1][h, b * BLOCK : (b + 1) * BLOCK]
                assert torch.equal(_bits(rows[0, h, x, : ref.shape[0]]), _bits(ref))
    tier.finish_step()
    assert meter.totals(tier="disk").cache_misses == 5 and meter.totals(tier="cpu").cache_misses == 2
    assert meter.totals(tier="disk").cache_hits == 0  # every wanted block was read in this step
    # rows appended to the last, partial block replace its cached copy
    extra = torch.randn(3, 10, 8, generator=gen).to(torch.bfloat16)
    tier.append(1, extra, extra, torch.arange(100, 110))
    pool.deferred = False
    tier.begin_step()
    slots = tier.resolve(1, torch.tensor([[[6], [6], [6]]]), torch.ones(1, 3, 1, dtype=torch.bool))
    rows = _resident_rows(tier, slots)
    assert torch.equal(_bits(rows[0, 2, 0, 4:14, 0]), _bits(extra[2]))


def test_block_cache_evicts_only_earlier_steps(tmp_path, gen):
    """Least recently used eviction by step: a step's blocks stay until it is done, and a step that
    needs more blocks than the cache holds is refused with a clear error."""
    block_bytes = BLOCK * 2 * 8 * 2
    tier = DiskTier.create(tmp_path / "kv.zarr", LAYOUT, block_tokens=BLOCK, cache_bytes=4 * block_bytes, chunk_tokens=CHUNK)
    refs = _fill(tier, gen, sizes=(160,))  # 10 blocks per head
    tier.reserve(160)
    pool = tier.cache

    def step(blocks):  # an eager step reading head 0's ``blocks`` of layer 0
        tier.begin_step()
        pool.tick()
        b = torch.tensor(blocks)[None, None].expand(1, 3, -1).clone()
        wanted = torch.zeros(1, 3, len(blocks), dtype=torch.bool)
        wanted[0, 0] = True
        pool.deferred = True
        pool.begin_step()
        tier.resolve(0, b, wanted)
        tier.fill_missed()
        return tier.resolve(0, b, wanted)[0, 0]

    s1 = step([0, 1, 2])
    assert (s1 >= 0).all() and len(pool) == 3
    s2 = step([2, 3, 4])  # needs 2 slots: 1 free, 1 evicted (block 0, the oldest; block 2 was used again)
    assert (s2 >= 0).all() and pool.slot_of(0, 0, 0) < 0 and pool.slot_of(0, 0, 1) >= 0 and pool.nbytes == 4 * block_bytes
    rows = pool.view[s2]
    for i, b in enumerate([2, 3, 4]):
        assert torch.equal(_bits(rows[i]), _bits(refs[0][0, b * BLOCK : (b + 1) * BLOCK]))
    with pytest.raises(Exception, match="raise the cache size"):
        step([5, 6, 7, 8, 9])


def test_block_cache_evicts_an_eager_steps_blocks_first(tmp_path, gen):
    """Blocks read for an eager step (a question's batch of positions) go before older blocks read
    for captured decode steps, so that a question does not flush what its answer reuses."""
    block_bytes = BLOCK * 2 * 8 * 2
    tier = DiskTier.create(tmp_path / "kv.zarr", LAYOUT, block_tokens=BLOCK, cache_bytes=4 * block_bytes, chunk_tokens=CHUNK)
    _fill(tier, gen, sizes=(160,))
    tier.reserve(160)
    pool = tier.cache

    def step(blocks, deferred):  # head 0's ``blocks`` of layer 0
        b = torch.tensor(blocks)[None, None].expand(1, 3, -1).clone()
        wanted = torch.zeros(1, 3, len(blocks), dtype=torch.bool)
        wanted[0, 0] = True
        tier.begin_step()
        pool.deferred = deferred
        pool.begin_step()
        slots = tier.resolve(0, b, wanted)
        if deferred:
            tier.fill_missed()
            slots = tier.resolve(0, b, wanted)
        pool.deferred = False
        assert (slots[0, 0] >= 0).all()

    step([0, 1], deferred=True)
    step([2, 3], deferred=False)
    step([4, 5], deferred=False)
    assert [pool.slot_of(0, 0, b) >= 0 for b in range(6)] == [True, True, False, False, True, True]
    step([4, 6], deferred=True)  # block 4, read eagerly, is now used by a decode step: kept
    step([7], deferred=False)
    assert pool.slot_of(0, 0, 4) >= 0 and pool.slot_of(0, 0, 0) < 0  # block 0 is the least recent of the rest


@pytest.mark.parametrize("seed", range(4))
def test_block_cache_under_random_operations_matches_full_reads(tmp_path, seed):
    """Lookups (deferred and eager), gathers, appends (partial blocks growing, chunks written) and
    clears in a random order, with a cache of 6 blocks (evicting all the time): every resident
    block a lookup returns holds the rows written, and every gather returns them."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    block_bytes = BLOCK * 2 * 8 * 2
    tier = DiskTier.create(tmp_path / "kv.zarr", LAYOUT, block_tokens=BLOCK, cache_bytes=6 * block_bytes, chunk_tokens=CHUNK)
    refs = [r.clone() for r in _fill(tier, gen, sizes=(70,))]  # (Hkv, n, 2, d) per layer
    pool = tier.cache
    for _ in range(40):
        n = refs[0].shape[1]
        tier.reserve(n)
        op = rng.choice(["deferred", "eager", "gather", "append", "clear"], p=[0.3, 0.3, 0.2, 0.15, 0.05])
        layer = int(rng.integers(2))
        if op in ("deferred", "eager"):
            blocks = torch.from_numpy(rng.integers(0, -(-n // BLOCK), (1, 3, 2)))
            blocks[0, :, 0] = torch.where(torch.from_numpy(rng.random(3) < 0.5), (n - 1) // BLOCK, blocks[0, :, 0])  # the growing block
            wanted = torch.from_numpy(rng.random((1, 3, 2)) < 0.8)
            tier.begin_step()
            pool.deferred = op == "deferred"
            pool.begin_step()
            slots = tier.resolve(layer, blocks, wanted)
            if op == "deferred":
                tier.fill_missed()
                slots = tier.resolve(layer, blocks, wanted)
            pool.deferred = False
            tier.finish_step()
            assert ((slots >= 0) | ~wanted).all()
            rows = pool.view[slots.clamp(min=0)]  # (1, Hkv, 2, block, 2, d)
            for h in range(3):
                for x in range(2):
                    if wanted[0, h, x]:
                        b = int(blocks[0, h, x])
                        ref = refs[layer][h, b * BLOCK : (b + 1) * BLOCK]
                        assert torch.equal(_bits(rows[0, h, x, : ref.shape[0]]), _bits(ref))
        elif op == "gather":
            ids = torch.from_numpy(rng.integers(0, n, (3, 5)))
            k, v = tier.gather(layer, ids)
            heads = torch.arange(3)[:, None]
            assert torch.equal(_bits(k), _bits(refs[layer][heads, ids, 0])) and torch.equal(_bits(v), _bits(refs[layer][heads, ids, 1]))
        elif op == "append":
            m = int(rng.integers(1, 20))
            for lay in range(2):
                kk = torch.randn(3, m, 8, generator=gen).to(torch.bfloat16)
                vv = torch.randn(3, m, 8, generator=gen).to(torch.bfloat16)
                tier.append(lay, kk, vv, torch.arange(n, n + m))
                refs[lay] = torch.cat([refs[lay], torch.stack([kk, vv], dim=2)], dim=1)
        else:
            pool.clear()
        assert len(pool) <= 6


def _compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("seed", range(4))
def test_pending_pieces_read_as_their_concatenation(seed):
    """Rows kept as the pieces they were appended in (copied asynchronously from a CUDA device):
    taking whole chunks, per-head slices and the joined array all equal plain concatenation."""
    from rcengine.storage.pending_rows import PendingRows, Segments, stage
    from rcengine.storage.rows import pack, to_raw_numpy

    g = torch.Generator().manual_seed(seed)
    dev = _compute_device()
    pending, parts = PendingRows(3, 8, np.dtype("<u2")), []
    for _ in range(6):
        n = int(torch.randint(0, 40, (1,), generator=g))
        k, v = (torch.randn(3, n, 8, generator=g).to(torch.bfloat16) for _ in range(2))
        pending.add(stage(pack(k.to(dev), v.to(dev))))
        parts.append(to_raw_numpy(pack(k, v)))
    ref = np.concatenate(parts, axis=1)
    cut = int(torch.randint(0, ref.shape[1] + 1, (1,), generator=g))
    taken = Segments(pending.take(cut))
    assert pending.rows == ref.shape[1] - cut
    assert np.array_equal(pending.array(), ref[:, cut:])
    for head in range(3):
        lo = int(torch.randint(0, cut + 1, (1,), generator=g))
        hi = int(torch.randint(lo, cut + 1, (1,), generator=g))
        got = taken.head_slices(head, lo, hi)
        assert all(s.flags.c_contiguous for s in got)
        joined = np.concatenate(got, axis=0) if got else ref[head, :0]
        assert np.array_equal(joined, ref[head, lo:hi])


def test_background_writes_stay_within_the_backlog(tmp_path, gen, monkeypatch):
    """With a backlog of one write, each chunk write waits for the one before; the store still holds
    exactly the rows appended (read back verified against every checksum)."""
    import rcengine.storage.disk_writes as disk_writes

    monkeypatch.setattr(disk_writes, "WRITE_BACKLOG_BYTES", 1)
    tier = DiskTier.create(tmp_path / "kv.zarr", LAYOUT, block_tokens=BLOCK, chunk_tokens=CHUNK, compute_device=_compute_device())
    queued = []
    submit = tier._files.submit
    tier._files.submit = lambda *a: (queued.append(len(tier._writes)), submit(*a))[1]
    refs = _fill(tier, gen)
    tier.flush()
    assert queued and max(queued) == 0  # no write was queued behind another
    reopened = DiskTier.open(tmp_path / "kv.zarr", checksums=tier.checksums)
    for layer, ref in enumerate(refs):
        k, v = reopened.gather(layer, torch.arange(ref.shape[1]).repeat(3, 1))
        assert torch.equal(_bits(k), _bits(ref[:, :, 0])) and torch.equal(_bits(v), _bits(ref[:, :, 1]))


@pytest.mark.parametrize("sizes", [(1, 2, 5, 7), (512, 3), (32768, 1), (64, 16)])
def test_device_checksums_equal_crc32c(sizes):
    """Block and file CRC-32C computed with tensor operations equal the host library's."""
    import google_crc32c

    from rcengine.storage.device_checksums import DeviceChecksums

    n, k = sizes[0], sizes[1]
    data = np.random.default_rng(n + k).integers(0, 256, size=(3, k, n), dtype=np.uint8)
    checks = DeviceChecksums(n, k, _compute_device())
    linear = checks.linear(torch.from_numpy(data).to(checks.device))
    blocks, files = checks.blocks(linear).cpu().numpy(), checks.files(linear).cpu().numpy()
    assert [[int(c) for c in row] for row in blocks] == [[google_crc32c.value(data[i, j].tobytes()) for j in range(k)] for i in range(3)]
    assert [int(c) for c in files] == [google_crc32c.value(data[i].tobytes()) for i in range(3)]


def test_chunks_checksummed_on_the_device_match_the_host(tmp_path, gen, monkeypatch):
    """Appends of whole chunk files are checksummed where the rows are (here the CPU, as on a GPU):
    every file's and block's checksum equals the host's for the same rows, and the store reads back
    verified."""
    import rcengine.storage.disk_writes as disk_writes

    sizes = (CHUNK, 2 * CHUNK, 37, 27, CHUNK, 5)  # whole chunks, then not aligned, then whole again
    rows = _fill(DiskTier.create(tmp_path / "host.zarr", LAYOUT, block_tokens=BLOCK, chunk_tokens=CHUNK), gen, sizes)
    stores = {}
    for name, on_device in (("host", ()), ("device", ("cpu",))):
        monkeypatch.setattr(disk_writes, "DEVICE_CHECKSUMS", on_device)
        tier = DiskTier.create(tmp_path / f"{name}.kv", LAYOUT, block_tokens=BLOCK, chunk_tokens=CHUNK)
        for layer, ref in enumerate(rows):
            start = 0
            for n in sizes:
                part = ref[:, start : start + n]
                tier.append(layer, part[:, :, 0], part[:, :, 1], torch.arange(start, start + n))
                start += n
        tier.flush()
        stores[name] = tier
    assert stores["device"]._device_checks is not None and stores["host"]._device_checks is None
    assert stores["device"].checksums == stores["host"].checksums
    reopened = DiskTier.open(tmp_path / "device.kv", checksums=stores["device"].checksums)
    for layer, ref in enumerate(rows):
        k, v = reopened.gather(layer, torch.arange(ref.shape[1]).repeat(3, 1))
        assert torch.equal(_bits(k), _bits(ref[:, :, 0])) and torch.equal(_bits(v), _bits(ref[:, :, 1]))


def test_a_committed_store_opened_with_its_writers_rows_reads_as_reopened(tmp_path, gen):
    """Opening the store a tier just wrote, carrying over that tier's positions and partial chunks,
    reads exactly what a plain reopen (which reads them back) reads."""
    tier = _make("disk", tmp_path, ByteMeter())
    refs = _fill(tier, gen)
    tier.flush()
    checksums = tier.checksums
    tier.close()
    carried = DiskTier.open(tmp_path / "kv.zarr", checksums=checksums, carry=tier)
    plain = DiskTier.open(tmp_path / "kv.zarr", checksums=checksums)
    for layer, ref in enumerate(refs):
        assert carried.num_rows(layer) == plain.num_rows(layer) == ref.shape[1]
        assert np.array_equal(carried.positions(layer), plain.positions(layer))
        ids = torch.arange(ref.shape[1]).repeat(3, 1)
        for a, b in zip(carried.gather(layer, ids), plain.gather(layer, ids), strict=True):
            assert torch.equal(_bits(a), _bits(b))
    other = DiskTier.create(tmp_path / "other.zarr", LAYOUT, block_tokens=BLOCK, chunk_tokens=2 * CHUNK)
    with pytest.raises(ValueError, match="not the one"):
        DiskTier.open(tmp_path / "kv.zarr", checksums=checksums, carry=other)


@pytest.mark.parametrize("sizes", [(1, 2, 5, 7), (512, 3), (32768, 1), (3000, 4)])
def test_the_checksum_kernel_equals_crc32c(sizes, monkeypatch):
    """The Triton kernel's block and file CRC-32C equal the host library's (CUDA, or Triton's
    interpreter on the CPU)."""
    import google_crc32c

    from rcengine.storage import crc_kernel, device_checksums
    from rcengine.storage.device_checksums import DeviceChecksums

    device = _compute_device()
    if not crc_kernel.available(device):
        pytest.skip("needs CUDA, or Triton's interpreter on the CPU")
    monkeypatch.setattr(device_checksums, "KERNEL", True)
    n, k = sizes[0], sizes[1]
    data = np.random.default_rng(n + k).integers(0, 256, size=(3, k, n), dtype=np.uint8)
    checks = DeviceChecksums(n, k, device)
    linear = checks.linear(torch.from_numpy(data).to(device))
    blocks, files = checks.blocks(linear).cpu().numpy(), checks.files(linear).cpu().numpy()
    assert [[int(c) for c in row] for row in blocks] == [[google_crc32c.value(data[i, j].tobytes()) for j in range(k)] for i in range(3)]
    assert [int(c) for c in files] == [google_crc32c.value(data[i].tobytes()) for i in range(3)]


@pytest.mark.parametrize("side_stream", [False, True])
def test_rows_staged_from_cuda_bring_the_host_paths_checksums(side_stream, monkeypatch):
    """Rows staged from a CUDA device (on the caller's stream or a side stream) arrive bit for bit,
    with the same block and file checksums as the same rows staged from the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from rcengine.storage import pending_rows
    from rcengine.storage.device_checksums import DeviceChecksums
    from rcengine.storage.pending_rows import stage
    from rcengine.storage.rows import pack

    monkeypatch.setattr(pending_rows, "SIDE_STREAM", side_stream)
    g = torch.Generator().manual_seed(7)
    k, v = (torch.randn(4, 4 * CHUNK, 8, generator=g).to(torch.bfloat16) for _ in range(2))
    block_bytes = BLOCK * 2 * 8 * 2
    ref = stage(pack(k, v), DeviceChecksums(block_bytes, 2 * CHUNK // BLOCK, "cpu"), BLOCK, CHUNK, 2)
    cuda_checks = DeviceChecksums(block_bytes, 2 * CHUNK // BLOCK, "cuda")
    got = stage(pack(k.cuda(), v.cuda()), cuda_checks, BLOCK, CHUNK, 2)
    assert np.array_equal(got.wait(), ref.data)
    assert np.array_equal(got.block_crcs, ref.block_crcs) and np.array_equal(got.file_crcs, ref.file_crcs)

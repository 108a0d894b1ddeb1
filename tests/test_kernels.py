"""The fused decode kernels against the PyTorch rule, on random states with padded plans (more
units chosen than the rule asks for, rows past the mid-region, empty tail slots).  Run on CUDA,
or on the CPU through Triton's interpreter (TRITON_INTERPRET=1) where Triton is installed."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import output_tolerance
from rcengine.engine.decode import kernels
from rcengine.engine.decode.selectors import expand_units
from rcengine.engine.decode.top import top_units
from rcengine.engine.rule.attention import Completion, TokenSet, normalize, rc_state
from rcengine.engine.rule.feature_maps import CentroidFeatures
from rcengine.engine.rule.summary import Summary

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="needs CUDA, or Triton's interpreter on the CPU")


@pytest.mark.parametrize("method", ["dense", "topk", "rc", "sink-tail"])
@pytest.mark.parametrize("unit", [1, 4])
@pytest.mark.parametrize("t,lanes", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("resident", [False, True])
def test_fused_kernels_match_the_rule(gen, method, unit, t, lanes, resident):
    """``lanes``: three queries of two sequences sharing the document's tail slots, each with slots
    of its own the other must not see.  ``resident``: rows in device memory, split into as many
    slices as fill the device (on the CPU: one slice of many blocks) instead of up to MAX_SLICES."""
    hkv, g, d, sink, ring, cap, n, centroids = 2, 4, 32, 3, 24, 200, 173, 8
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    qg = rnd(t, hkv, g, d)
    sink_k, sink_v = rnd(hkv, sink, d), rnd(hkv, sink, d)
    tail_k, tail_v = rnd(hkv, ring, d), rnd(hkv, ring, d)
    tail_pos = torch.full((ring,), -1, dtype=torch.int64)
    tail_pos[5:20] = torch.arange(500, 515)  # 15 held tokens; queries at 512.. see some of them
    q_pos = torch.arange(512, 512 + t)
    tail_lane = torch.full((ring,), -1, dtype=torch.int64)
    q_lane = torch.tensor([0, 1, 0][:t])
    if lanes:
        tail_lane[12:16], tail_lane[16:20] = 0, 1  # the newest held tokens belong to one sequence or the other
    rows = rnd(cap, hkv, 2, d)
    k_mid = rows[:n, :, 0].transpose(0, 1)[None]  # (1, Hkv, n, d)
    v_mid = rows[:n, :, 1].transpose(0, 1)[None]
    fmap = CentroidFeatures.fit(k_mid, centroids, seed=1)
    summary = Summary.empty(1, hkv, centroids, d)
    summary.fold(fmap.key_logits(k_mid), v_mid)
    clusters = torch.zeros(hkv, cap, dtype=torch.int32)
    clusters[:, :n] = fmap.assign(k_mid)[0].to(torch.int32)
    units = math.ceil(cap / unit)
    count, live = 7, 5  # a padded plan: 7 units chosen, the rule asks for 5
    ids = torch.stack([torch.stack([torch.randperm(units, generator=gen)[:count] for _ in range(hkv)]) for _ in range(t)])
    ids[0, 0, 1] = (n + 2) // unit  # a unit past the mid-region, within the buffer
    n_mid, live_t = torch.tensor(n), torch.tensor(live)
    dense, selects, completes = method == "dense", method in ("topk", "rc"), method == "rc"
    to = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    out = kernels.fused_attention(
        to(qg), to(sink_k), to(sink_v), to(tail_k), to(tail_v), tail_pos.to(DEVICE), q_pos.to(DEVICE),
        to(rows) if (dense or selects) else None, ids.to(DEVICE) if selects else None, unit,
        cap if dense else (count * unit if selects else 0), n_mid.to(DEVICE), live_t.to(DEVICE), dense, d**-0.5,
        centroids=fmap.centroids.to(DEVICE) if completes else None,
        summary=Summary(**{k: v.to(DEVICE) for k, v in summary.state_dict().items()}) if completes else None,
        clusters=clusters.to(DEVICE) if completes else None,
        tail_lane=tail_lane.to(DEVICE) if lanes else None, q_lane=q_lane.to(DEVICE) if lanes else None, resident=resident,
    )
    # The reference: the rule in float64 on the same (rounded) inputs.
    f64 = lambda x: to(x).double().cpu()  # noqa: E731
    q64 = f64(qg)
    for i in range(t):
        seen = (tail_pos >= 0) & (tail_pos <= q_pos[i]) & ((tail_lane < 0) | (tail_lane == q_lane[i]))
        anchors = [TokenSet(f64(sink_k)[None], f64(sink_v)[None]), TokenSet(f64(tail_k)[None][:, :, seen], f64(tail_v)[None][:, :, seen])]
        retrieved = None
        if dense:
            retrieved = TokenSet(f64(k_mid), f64(v_mid))
        elif selects:
            tok, ok = expand_units(ids[i : i + 1], unit, live, n)
            tok = tok.clamp(max=cap - 1)
            kk = f64(rows)[tok, torch.arange(hkv)[None, :, None], 0]  # (1, Hkv, R, d)
            vv = f64(rows)[tok, torch.arange(hkv)[None, :, None], 1]
            retrieved = TokenSet(kk, vv, ok)
        completion = Completion(fmap, Summary(**{k: v.double() for k, v in summary.state_dict().items()})) if completes else None
        ref = normalize(rc_state(q64[i : i + 1], anchors, d**-0.5, retrieved, completion))[0]
        got = out[i].double().cpu()
        assert (got - ref).abs().max() <= output_tolerance(dtype) * ref.abs().max(), (got - ref).abs().max()


@pytest.mark.parametrize("bounds", [False, True])
def test_selection_scores_match_the_group_max(gen, bounds):
    t, hkv, g, d, cap, n, unit = 3, 2, 4, 32, 300, 250, 8
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    qg = torch.randn(t, hkv, g, d, generator=gen).to(DEVICE, dtype)
    a = torch.randn(hkv, cap, d, generator=gen).to(DEVICE, dtype)
    b = (a - 1.0) if bounds else None
    units = 40 if bounds else cap
    got = kernels.selection_scores(qg, a, units, torch.tensor(n, device=DEVICE), unit if bounds else 1, b)
    q = qg.double().transpose(0, 1)  # (Hkv, T, G, d)
    if bounds:
        ref = q.clamp_min(0) @ a[:, :units].double().transpose(1, 2)[:, None] + q.clamp_max(0) @ b[:, :units].double().transpose(1, 2)[:, None]
        past = torch.arange(units, device=DEVICE) * unit >= n
    else:
        ref = q @ a.double().transpose(1, 2)[:, None]
        past = torch.arange(units, device=DEVICE) >= n
    ref = ref.amax(dim=2).transpose(0, 1).masked_fill(past, -math.inf)  # (T, Hkv, units)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert ((got.double() - ref)[finite].abs() <= output_tolerance(dtype) * ref[finite].abs().max()).all()


@pytest.mark.parametrize("method", ["topk", "rc"])
@pytest.mark.parametrize("unit", [1, 8])
def test_fused_kernels_read_blocks_through_a_slot_table(gen, method, unit):
    """Rows read in place from a block cache (the disk tier's): blocks of 8 tokens of one head each
    in a slot, found through a table, some not resident (their rows count as not retrieved)."""
    hkv, g, d, sink, ring, cap, n, centroids, pb, t = 2, 4, 32, 3, 24, 200, 173, 8, 8, 2
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    qg = rnd(t, hkv, g, d)
    sink_k, sink_v, tail_k, tail_v = rnd(hkv, sink, d), rnd(hkv, sink, d), rnd(hkv, ring, d), rnd(hkv, ring, d)
    tail_pos = torch.full((ring,), -1, dtype=torch.int64)
    tail_pos[2:12] = torch.arange(500, 510)
    q_pos = torch.arange(512, 512 + t)
    rows = rnd(cap, hkv, 2, d)
    k_mid, v_mid = rows[:n, :, 0].transpose(0, 1)[None], rows[:n, :, 1].transpose(0, 1)[None]
    fmap = CentroidFeatures.fit(k_mid, centroids, seed=1)
    summary = Summary.empty(1, hkv, centroids, d)
    summary.fold(fmap.key_logits(k_mid), v_mid)
    clusters = torch.zeros(hkv, cap, dtype=torch.int32)
    clusters[:, :n] = fmap.assign(k_mid)[0].to(torch.int32)
    blocks = cap // pb
    table = torch.randperm(hkv * blocks + 5, generator=gen)[: hkv * blocks].view(hkv, blocks).to(torch.int32)
    table[0, 3] = table[1, 10] = -1  # not resident
    pool = rnd(hkv * blocks + 5, pb, 2, d)  # slots nobody points to hold other rows
    for h in range(hkv):
        for b in range(blocks):
            if table[h, b] >= 0:
                pool[table[h, b]] = rows[b * pb : (b + 1) * pb, h]
    units, count, live = math.ceil(cap / unit), 7, 5
    ids = torch.stack([torch.stack([torch.randperm(units, generator=gen)[:count] for _ in range(hkv)]) for _ in range(t)])
    ids[:, 0, 0] = 3 * pb // unit  # a unit in head 0's missing block
    ids[0, 1, 2] = 10 * pb // unit + (1 if unit == 1 else 0)  # one in head 1's
    completes = method == "rc"
    to = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    out = kernels.fused_attention(
        to(qg), to(sink_k), to(sink_v), to(tail_k), to(tail_v), tail_pos.to(DEVICE), q_pos.to(DEVICE),
        to(pool), ids.to(DEVICE), unit, count * unit, torch.tensor(n).to(DEVICE), torch.tensor(live).to(DEVICE), False, d**-0.5,
        centroids=fmap.centroids.to(DEVICE) if completes else None,
        summary=Summary(**{k: v.to(DEVICE) for k, v in summary.state_dict().items()}) if completes else None,
        clusters=clusters.to(DEVICE) if completes else None, table=table.to(DEVICE), table_block=pb,
    )
    f64 = lambda x: to(x).double().cpu()  # noqa: E731
    for i in range(t):
        seen = (tail_pos >= 0) & (tail_pos <= q_pos[i])
        anchors = [TokenSet(f64(sink_k)[None], f64(sink_v)[None]), TokenSet(f64(tail_k)[None][:, :, seen], f64(tail_v)[None][:, :, seen])]
        tok, ok = expand_units(ids[i : i + 1], unit, live, n)
        tok = tok.clamp(max=cap - 1)
        ok = ok & (table[torch.arange(hkv)[None, :, None], tok // pb] >= 0)
        kk = f64(rows)[tok, torch.arange(hkv)[None, :, None], 0]
        vv = f64(rows)[tok, torch.arange(hkv)[None, :, None], 1]
        completion = Completion(fmap, Summary(**{k: v.double() for k, v in summary.state_dict().items()})) if completes else None
        ref = normalize(rc_state(f64(qg)[i : i + 1], anchors, d**-0.5, TokenSet(kk, vv, ok), completion))[0]
        got = out[i].double().cpu()
        assert (got - ref).abs().max() <= output_tolerance(dtype) * ref.abs().max(), (got - ref).abs().max()


@pytest.mark.parametrize("rows,n,count", [(1, 8, 3), (8, 8192, 82), (16, 2048, 21), (3, 1000, 1000), (2, 5000, 1)])
def test_top_units_matches_topk(gen, rows, n, count):
    """The one-program Top-K against torch.topk: the same indices in the same order on distinct
    scores (with a tail of -inf: rows past the mid-region); among equal scores the lower index first."""
    s = torch.randn(rows, n, generator=gen)
    s[:, n - n // 5 :] = -math.inf
    s = s.to(DEVICE)
    got = top_units(s, count)
    want = s.topk(count, dim=-1)
    assert got.shape == want.indices.shape and got.dtype == torch.int64
    torch.testing.assert_close(s.gather(-1, got), want.values)  # best first, the same values
    real = want.values > -math.inf
    assert torch.equal(got[real], want.indices[real])
    ties = torch.full((rows, n), 1.5, device=DEVICE)
    ties[:, 7::11] = 2.0
    got = top_units(ties, count).cpu()
    top = torch.arange(n)[7::11].tolist() + [i for i in range(n) if (i - 7) % 11 or i < 7]
    assert got.tolist() == [top[:count]] * rows


@pytest.mark.parametrize("unit", [1, 4, 16])
def test_stage_units_reads_each_selected_unit_once(gen, unit):
    """Several queries' units staged for the slot-table read: every unit some query asks for (its
    first ``live``) has one slot holding its rows (those before n_mid), the rest none; the count is
    the distinct (row, KV head) pairs read.  Against a full read of the rows."""
    from rcengine.engine.decode.stage import stage_units

    t, hkv, d, cap, n, count, live = 3, 2, 8, 70, 67, 5, 4
    units = math.ceil(cap / unit)
    rows = torch.randn(cap, hkv, 2, d, generator=gen)
    ids = torch.stack([torch.stack([torch.randperm(units, generator=gen)[:count] for _ in range(hkv)]) for _ in range(t)])
    ids[1, 0] = ids[0, 0]  # two queries asking for the same units
    ids[2, 1, 0] = units - 1  # the last unit, partly past n_mid
    staging, table, read = stage_units(rows.to(DEVICE), ids.to(DEVICE), unit, torch.tensor(live).to(DEVICE),
                                       torch.tensor(n).to(DEVICE))
    staging, table = staging.cpu(), table.cpu()
    assert table.shape == (hkv, units) and table.dtype == torch.int32
    want = 0
    for h in range(hkv):
        asked = set(ids[:, h, :live].flatten().tolist())
        assert {b for b in range(units) if table[h, b] >= 0} == asked
        slots = table[h][table[h] >= 0]
        assert slots.unique().numel() == slots.numel() and ((slots >= h * t * count) & (slots < (h + 1) * t * count)).all()
        for b in asked:
            valid = max(0, min(unit, n - b * unit))
            torch.testing.assert_close(staging[table[h, b], :valid], rows[b * unit : b * unit + valid, h], rtol=0, atol=0)
            want += valid
    assert int(read) == want

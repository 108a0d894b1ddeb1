"""The rule for one layer's decode queries as two Triton kernels (the CUDA fast path).

:func:`fused_attention` computes what ``rc_state`` computes for the configured method, for the
centroid estimator (or none), reading the retrieved rows straight from the tier's device-readable
buffer (zero-copy host memory or device memory) by row id, without gathering them first:

1. ``_partial_kernel``, one program per (query position, KV head, slice of the mid tokens): an
   online softmax over its slice (slice 0 also over the sink and the visible tail), in float32,
   and, with completion, the retrieved tokens' share of the summary (``sum lambda_j`` and ``sum
   lambda_j v_j`` with ``lambda_j = w[cluster(j)]``), written as partial states;
2. ``_combine_kernel``, one program per query row (position, KV head, query head of its group):
   the log-sum-exp merge of the partials in one pass, the summary's estimate of the unread tokens
   with the retrieved share subtracted (under the centroid weights the partial kernel used, stored
   by its slice 0) and the safety checks of ``completion_state``, the merge of the two, one
   normalisation.

Each partial program serves the G query heads of its KV head (padded to 16 rows for the tensor cores).
Everything is fixed by the plan (static shapes) and read from device tensors, so the kernels run
inside a captured CUDA graph.  The generic PyTorch rule stays the reference: the tests compare the
two (``tests/test_gpu.py``; on the CPU through Triton's interpreter when it is installed).
"""

from __future__ import annotations

import functools
import math

import torch

from ...storage.triton_support import available, tl, triton  # noqa: F401 (available: this module's API)

# Drop the completion below this fraction of the summary's total mass (as rule.attention does).
from ..rule.attention import RESIDUAL_DROP_FRACTION

BLOCK_N = 32  # tokens per inner step of a program
# Rows in device memory: programs in all per multiprocessor (split-K as in flash-decoding; more
# slices only add partial states for the combine to read).  0: as host rows (the benchmarks' comparison).
RESIDENT_WAVES = 4
COMBINE_BLOCK = 16  # partial states a combine program merges per step (a (16, d) float32 tile)
MAX_SLICES = 1024  # slices of the mid tokens per (position, KV head): one block of rows each at 1 % and 128K, so that every program's PCIe reads are in flight at once


if triton is not None:

    @triton.jit
    def _online(q, k, v, valid, m_i, l_i, acc, scale, IEEE: tl.constexpr):
        """One block of exact attention: scores of ``q (GP, D)`` against ``k (N, D)``, masked by
        ``valid (N,)``, folded into the running max ``m_i``, sum ``l_i`` and ``acc (GP, D)``."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * rescale + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * rescale[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _weights(q, cent_ptr, beta_ptr, h, CR, D: tl.constexpr, CRP: tl.constexpr):
        """Centroid weights ``w (GP, CRP) = exp(a(q) + beta - alpha)`` and ``alpha (GP,)`` with
        ``a(q)_c = q . c / sqrt(D)``; padded centroids get weight 0."""
        offs_c = tl.arange(0, CRP)
        offs_d = tl.arange(0, D)
        cmask = offs_c < CR
        cent = tl.load(cent_ptr + (h * CR + offs_c[:, None]) * D + offs_d[None, :], mask=cmask[:, None], other=0.0)
        aq = tl.dot(q.to(tl.float32), tl.trans(cent.to(tl.float32)), input_precision="ieee") / tl.sqrt(D * 1.0)
        beta = tl.load(beta_ptr + h * CR + offs_c, mask=cmask, other=float("-inf"))
        g = aq + beta[None, :]
        alpha = tl.max(g, axis=1)
        alpha_ref = tl.where(alpha == float("-inf"), 0.0, alpha)
        w = tl.exp(g - alpha_ref[:, None])
        return w, alpha

    @triton.jit
    def _partial_kernel(
        q_ptr, sink_k, sink_v, tail_k, tail_v, tail_pos, q_pos, tail_lane, q_lane, rows, ids, n_mid_ptr, live_ptr,
        cent_ptr, beta_ptr, clusters, part_m, part_l, part_acc, part_lam, part_lamv, part_w, part_alpha, table,
        scale, HKV, S, C, R, U, CAP, CR, CHUNK, NS, NB, PB,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, UNIT: tl.constexpr, DENSE: tl.constexpr,
        COMPLETE: tl.constexpr, CRP: tl.constexpr, IEEE: tl.constexpr, BN: tl.constexpr, SLOTTED: tl.constexpr,
        LANES: tl.constexpr,
    ):
        pid = tl.program_id(0)  # query position t and KV head h
        sl = tl.program_id(1)  # slice of the mid tokens
        t = pid // HKV
        h = pid % HKV
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BN)
        gmask = offs_g < G
        q = tl.load(q_ptr + ((t * HKV + h) * G + offs_g[:, None]) * D + offs_d[None, :], mask=gmask[:, None], other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        if sl == 0:  # the anchors: the sink, then the tail slots this position sees
            for n0 in range(0, S, BN):
                n = n0 + offs_n
                ok = n < S
                k = tl.load(sink_k + (h * S + n[:, None]) * D + offs_d[None, :], mask=ok[:, None], other=0.0)
                v = tl.load(sink_v + (h * S + n[:, None]) * D + offs_d[None, :], mask=ok[:, None], other=0.0)
                m_i, l_i, acc = _online(q, k, v, ok, m_i, l_i, acc, scale, IEEE)
            qp = tl.load(q_pos + t)
            if LANES:  # several sequences: the document's slots (lane -1) and the query's own lane's
                ql = tl.load(q_lane + t)
            for n0 in range(0, C, BN):
                n = n0 + offs_n
                pos = tl.load(tail_pos + n, mask=n < C, other=-1)
                ok = (pos >= 0) & (pos <= qp)
                if LANES:
                    lane = tl.load(tail_lane + n, mask=n < C, other=-1)
                    ok = ok & ((lane < 0) | (lane == ql))
                k = tl.load(tail_k + (h * C + n[:, None]) * D + offs_d[None, :], mask=ok[:, None], other=0.0)
                v = tl.load(tail_v + (h * C + n[:, None]) * D + offs_d[None, :], mask=ok[:, None], other=0.0)
                m_i, l_i, acc = _online(q, k, v, ok, m_i, l_i, acc, scale, IEEE)
        if COMPLETE:
            w, alpha = _weights(q, cent_ptr, beta_ptr, h, CR, D, CRP)
            lam_s = tl.zeros([GP], tl.float32)
            lam_v = tl.zeros([GP, D], tl.float32)
            offs_c = tl.arange(0, CRP)
        n_mid = tl.load(n_mid_ptr)
        live = tl.load(live_ptr)
        start = sl * CHUNK
        stop = tl.minimum(start + CHUNK, R)
        for n0 in range(start, stop, BN):
            r = n0 + offs_n
            inside = r < stop
            if DENSE:
                row = r
                ok = inside & (row < n_mid)
            else:  # r-th retrieved token: token r % UNIT of the (r // UNIT)-th chosen unit
                unit = r // UNIT
                uid = tl.load(ids + (t * HKV + h) * U + unit, mask=inside, other=0)
                row = uid * UNIT + r % UNIT
                ok = inside & (unit < live) & (row < n_mid)
            row = tl.where(ok, row, 0)
            if SLOTTED:  # rows of blocks of PB tokens, each in a slot of a cache: table (Hkv, NB) -> slot or -1
                slot = tl.load(table + h * NB + row // PB, mask=ok, other=-1)
                ok = ok & (slot >= 0)
                phys = tl.where(ok, slot, 0).to(tl.int64) * PB + row % PB
                base = rows + phys[:, None] * 2 * D + offs_d[None, :]
            else:
                base = rows + (row[:, None].to(tl.int64) * HKV + h) * 2 * D + offs_d[None, :]
            k = tl.load(base, mask=ok[:, None], other=0.0)
            v = tl.load(base + D, mask=ok[:, None], other=0.0)
            m_i, l_i, acc = _online(q, k, v, ok, m_i, l_i, acc, scale, IEEE)
            if COMPLETE:  # lambda_j = w[cluster(j)]: the retrieved token's share of the summary
                cid = tl.load(clusters + h * CAP + row, mask=ok, other=0)
                onehot = ((cid[:, None] == offs_c[None, :]) & ok[:, None]).to(tl.float32)
                lam = tl.dot(w, tl.trans(onehot), input_precision="ieee")
                lam_s += tl.sum(lam, axis=1)
                lam_v += tl.dot(lam, v.to(tl.float32), input_precision="ieee")
        out = pid * NS + sl  # partial states of the G real query rows only (the padding is not stored)
        tl.store(part_m + out * G + offs_g, m_i, mask=gmask)
        tl.store(part_l + out * G + offs_g, l_i, mask=gmask)
        tl.store(part_acc + (out * G + offs_g[:, None]) * D + offs_d[None, :], acc, mask=gmask[:, None])
        if COMPLETE:
            tl.store(part_lam + out * G + offs_g, lam_s, mask=gmask)
            tl.store(part_lamv + (out * G + offs_g[:, None]) * D + offs_d[None, :], lam_v, mask=gmask[:, None])
            if sl == 0:  # the weights every slice used (the same code on the same q), for the combine
                tl.store(part_w + (pid * G + offs_g[:, None]) * CRP + offs_c[None, :], w, mask=gmask[:, None])
                tl.store(part_alpha + pid * G + offs_g, alpha, mask=gmask)

    @triton.jit
    def _combine_kernel(
        out_ptr, part_m, part_l, part_acc, part_lam, part_lamv, part_w, part_alpha, s_ptr, u_ptr, vmax_ptr,
        HKV, CR, NS, drop,
        G: tl.constexpr, D: tl.constexpr, COMPLETE: tl.constexpr, CRP: tl.constexpr, SB: tl.constexpr,
    ):
        row = tl.program_id(0)  # one query row: position t, KV head h, query head g of h's group
        pid = row // G
        g = row % G
        h = pid % HKV
        offs_d = tl.arange(0, D)
        offs_s = tl.arange(0, SB)
        # One pass over the partial states, SB at a time, with a running max (all G*T*Hkv rows in
        # parallel: the merge is a few dependent loads per row, not a loop per KV head).
        m = tl.max(tl.full([SB], float("-inf"), tl.float32), axis=0)
        den = tl.sum(tl.zeros([SB], tl.float32), axis=0)
        num = tl.zeros([D], tl.float32)
        lam_s = tl.sum(tl.zeros([SB], tl.float32), axis=0)
        lam_v = tl.zeros([D], tl.float32)
        for s0 in range(0, NS, SB):
            sm = (s0 + offs_s) < NS
            idx = (pid * NS + s0 + offs_s) * G + g  # (SB,)
            ms = tl.load(part_m + idx, mask=sm, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(ms, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            fa = tl.exp(m - m_ref)
            f = tl.exp(ms - m_ref)
            den = den * fa + tl.sum(f * tl.load(part_l + idx, mask=sm, other=0.0), axis=0)
            acc = tl.load(part_acc + idx[:, None] * D + offs_d[None, :], mask=sm[:, None], other=0.0)
            num = num * fa + tl.sum(f[:, None] * acc, axis=0)
            m = m_new
            if COMPLETE:
                lam_s += tl.sum(tl.load(part_lam + idx, mask=sm, other=0.0), axis=0)
                lam_v += tl.sum(tl.load(part_lamv + idx[:, None] * D + offs_d[None, :], mask=sm[:, None], other=0.0), axis=0)
        if COMPLETE:  # the summary's estimate of the unread tokens (completion_state), merged
            offs_c = tl.arange(0, CRP)
            cmask = offs_c < CR
            # the centroid weights exactly as the partial kernel used them (so den_all - lam_s
            # subtracts like from like)
            w = tl.load(part_w + (pid * G + g) * CRP + offs_c, mask=cmask, other=0.0)
            alpha = tl.load(part_alpha + pid * G + g)
            u = tl.load(u_ptr + h * CR + offs_c, mask=cmask, other=0.0)
            summ = tl.load(s_ptr + (h * CR + offs_c[:, None]) * D + offs_d[None, :], mask=cmask[:, None], other=0.0)
            den_all = tl.sum(w * u, axis=0)
            den_u = den_all - lam_s
            num_u = tl.sum(w[:, None] * summ, axis=0) - lam_v
            ok = (den_u > 0) & (den_u > drop * den_all) & (alpha > float("-inf"))
            den_safe = tl.where(ok, den_u, 1.0)
            norm = tl.sqrt(tl.sum(num_u * num_u, axis=0)) / den_safe
            vmax = tl.load(vmax_ptr + h)
            shrink = tl.where(norm > vmax, vmax / tl.maximum(norm, 1e-30), 1.0)
            num_u = tl.where(ok, num_u * shrink, 0.0)
            den_u = tl.where(ok, den_u, 0.0)
            m_u = tl.where(ok, alpha, float("-inf"))
            top = tl.maximum(m, m_u)
            top_ref = tl.where(top == float("-inf"), 0.0, top)
            fa = tl.exp(m - top_ref)
            fb = tl.exp(m_u - top_ref)
            num = num * fa + num_u * fb
            den = den * fa + den_u * fb
        o = tl.where(den > 0, num / tl.maximum(den, 1e-38), 0.0)
        tl.store(out_ptr + row * D + offs_d, o.to(out_ptr.dtype.element_ty))


if triton is not None:

    @triton.jit
    def _score_kernel(q_ptr, a_ptr, b_ptr, out_ptr, n_ptr, HKV, T, N, CAP, UNIT,
                      G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BOUNDS: tl.constexpr, IEEE: tl.constexpr,
                      BS: tl.constexpr):
        """Group scores of one KV head over ``BS`` keys (or blocks): ``max_g q_g . k`` (``BOUNDS``:
        ``max_g q_g+ . hi + q_g- . lo`` of a block's bounds); units past ``n`` rows get -inf."""
        h = tl.program_id(0)
        offs = tl.program_id(1) * BS + tl.arange(0, BS)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        inside = offs < N
        a = tl.load(a_ptr + (h * CAP + offs[:, None]) * D + offs_d[None, :], mask=inside[:, None], other=0.0)
        if BOUNDS:
            b = tl.load(b_ptr + (h * CAP + offs[:, None]) * D + offs_d[None, :], mask=inside[:, None], other=0.0)
        n = tl.load(n_ptr)
        real = inside & (offs * UNIT < n)
        for t in range(0, T):
            q = tl.load(q_ptr + ((t * HKV + h) * G + offs_g[:, None]) * D + offs_d[None, :], mask=(offs_g < G)[:, None], other=0.0)
            if BOUNDS:
                if IEEE:
                    s = tl.dot(tl.maximum(q, 0.0), tl.trans(a), input_precision="ieee") + \
                        tl.dot(tl.minimum(q, 0.0), tl.trans(b), input_precision="ieee")
                else:
                    s = tl.dot(tl.maximum(q, 0.0).to(a.dtype), tl.trans(a)) + tl.dot(tl.minimum(q, 0.0).to(b.dtype), tl.trans(b))
            else:
                if IEEE:
                    s = tl.dot(q, tl.trans(a), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(a))
            s = tl.where((offs_g < G)[:, None], s, float("-inf"))
            best = tl.max(s, axis=0)
            tl.store(out_ptr + (t * HKV + h) * N + offs, tl.where(real, best, float("-inf")), mask=inside)


def selection_scores(qg: torch.Tensor, a: torch.Tensor, n: int, n_mid: torch.Tensor, unit: int = 1,
                     b: torch.Tensor | None = None) -> torch.Tensor:
    """Group scores for selection, ``qg: (T, Hkv, G, d)`` against the first ``n`` rows of ``a: (Hkv,
    capacity, d)`` (keys; with ``b``, the max and min bounds of blocks of ``unit`` tokens) ->
    ``(T, Hkv, n)`` float32, -inf for units past the ``n_mid`` mid rows.  Reads ``a`` (and ``b``)
    once for all T G queries."""
    t, hkv, g, d = qg.shape
    out = torch.empty(t, hkv, n, dtype=torch.float32, device=qg.device)
    bs = 128  # keys per program: a (128, d) tile is 32 KB of bf16 at d 128, read once for every query
    _score_kernel[(hkv, math.ceil(n / bs))](
        qg.contiguous(), a, b if b is not None else a, out, n_mid, hkv, t, n, a.shape[1], unit,
        G=g, GP=_pow2(g), D=d, BOUNDS=b is not None, IEEE=qg.dtype == torch.float32, BS=bs,
    )
    return out


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _pow2(x: int, at_least: int = 16) -> int:
    return max(at_least, 1 << max(0, (x - 1).bit_length()))


def fused_attention(
    qg: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
    tail_pos: torch.Tensor, q_pos: torch.Tensor, rows: torch.Tensor | None, ids: torch.Tensor | None, unit: int,
    rows_read: int, n_mid: torch.Tensor, live: torch.Tensor, dense: bool, scale: float,
    centroids: torch.Tensor | None = None, summary=None, clusters: torch.Tensor | None = None,  # noqa: ANN001 (a Summary)
    table: torch.Tensor | None = None, table_block: int = 1, tail_lane: torch.Tensor | None = None,
    q_lane: torch.Tensor | None = None, resident: bool = False,
) -> torch.Tensor:
    """One layer's decode attention for ``qg: (T, Hkv, G, d)`` -> ``(T, Hkv, G, d)`` in qg's dtype.

    - anchors: ``sink_k, sink_v: (Hkv, S, d)``; the tail ring ``tail_k, tail_v: (Hkv, C, d)`` with
      slot positions ``tail_pos: (C,)``; query positions ``q_pos: (T,)``;
    - the mid-region: ``rows: (cap, Hkv, 2, d)`` (device-readable), ``n_mid`` rows of it valid;
      ``dense``: every row; otherwise ``ids: (T, Hkv, U)`` units of ``unit`` tokens, best first, of
      which the first ``live`` count (``n_mid``, ``live``: 0-dim int64 device tensors);
      ``rows_read``: mid tokens per program row (``U * unit``, or the rows' capacity when dense);
    - completion (centroid estimator): ``centroids: (1, Hkv, C, d)``, the summary (``S, u, beta,
      v_max``) and ``clusters: (Hkv, cap)`` the centroid of every mid row;
    - a block cache instead (the disk tier): ``rows: (slots, table_block, 2, d)``, each slot one
      KV head's block of ``table_block`` rows, and ``table: (Hkv, blocks)`` int32 the slot of each
      block, -1 where it is not resident (its rows then count as not retrieved);
    - several sequences sharing the document (batched questions): ``tail_lane: (C,)`` the lane of
      each tail slot (-1: the document's) and ``q_lane: (T,)`` each query's; a query sees the
      document's slots and its own lane's;
    - ``resident``: the rows are in device memory (split into about RESIDENT_WAVES programs per
      multiprocessor; host rows read over PCIe into up to MAX_SLICES slices each).
    """
    t, hkv, g, d = qg.shape
    dev = qg.device
    # The kernels index with plain strides: every tensor they read is made contiguous (a no-op for
    # the engine's own buffers, so a captured step still reads them in place).
    qg, sink_k, sink_v, tail_k, tail_v = (x.contiguous() for x in (qg, sink_k, sink_v, tail_k, tail_v))
    rows = rows.contiguous() if rows is not None else None
    ids = ids.contiguous() if ids is not None else None
    clusters = clusters.contiguous() if clusters is not None else None
    s_len, c_len = sink_k.shape[1], tail_k.shape[1]
    complete = centroids is not None
    ieee = qg.dtype == torch.float32
    gp = _pow2(g)
    r = rows_read if rows is not None else 0
    slices = MAX_SLICES if not (resident and RESIDENT_WAVES) else max(1, math.ceil(RESIDENT_WAVES * _multiprocessors(dev) / (t * hkv)))
    chunk = BLOCK_N * max(1, math.ceil(r / (BLOCK_N * slices)))
    ns = max(1, math.ceil(r / chunk))
    f32 = dict(dtype=torch.float32, device=dev)
    part_m = torch.empty(t * hkv, ns, g, **f32)
    part_l = torch.empty(t * hkv, ns, g, **f32)
    part_acc = torch.empty(t * hkv, ns, g, d, **f32)
    part_lam = torch.empty(t * hkv, ns, g, **f32) if complete else part_m
    part_lamv = torch.empty(t * hkv, ns, g, d, **f32) if complete else part_acc
    cr = centroids.shape[-2] if complete else 1
    crp = _pow2(cr)
    part_w = torch.empty(t * hkv, g, crp, **f32) if complete else part_m
    part_alpha = torch.empty(t * hkv, g, **f32) if complete else part_m
    # (empty: stand-ins are never read, and an empty tensor launches no kernel)
    dummy_i = torch.empty(1, dtype=torch.int64, device=dev)
    dummy_t = torch.empty(1, dtype=torch.int32, device=dev)
    table = table.contiguous() if table is not None else None
    cent = centroids.reshape(hkv, cr, d).contiguous() if complete else part_acc
    beta = summary.beta.reshape(hkv, cr).contiguous() if complete else part_m
    cap = clusters.shape[1] if complete else 1
    # Pointers a variant never reads still fix its argument types: stand-ins of the real dtypes.
    _partial_kernel[(t * hkv, ns)](
        qg, sink_k, sink_v, tail_k, tail_v, tail_pos, q_pos, tail_lane if tail_lane is not None else tail_pos,
        q_lane if q_lane is not None else q_pos, rows if rows is not None else sink_k,
        ids if ids is not None else dummy_i, n_mid, live, cent, beta, clusters if complete else dummy_i,
        part_m, part_l, part_acc, part_lam, part_lamv, part_w, part_alpha, table if table is not None else dummy_t,
        scale, hkv, s_len, c_len, r, ids.shape[-1] if ids is not None else 0, cap, cr, chunk, ns,
        table.shape[1] if table is not None else 1, table_block,
        G=g, GP=gp, D=d, UNIT=unit, DENSE=dense, COMPLETE=complete, CRP=crp, IEEE=ieee, BN=BLOCK_N, SLOTTED=table is not None,
        LANES=tail_lane is not None,
    )
    out = torch.empty_like(qg)
    _combine_kernel[(t * hkv * g,)](
        out, part_m, part_l, part_acc, part_lam, part_lamv, part_w, part_alpha,
        summary.S.reshape(hkv, cr, d).contiguous() if complete else part_acc,
        summary.u.reshape(hkv, cr).contiguous() if complete else part_m,
        summary.v_max.reshape(hkv).contiguous() if complete else part_m,
        hkv, cr, ns, RESIDUAL_DROP_FRACTION,
        G=g, D=d, COMPLETE=complete, CRP=crp, SB=COMBINE_BLOCK,
    )
    return out

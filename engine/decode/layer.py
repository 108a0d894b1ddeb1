"""What one attention layer computes under rcengine, in prefill and in decode.

- :func:`prefill_attention`: exact causal attention of a chunk's queries over everything so far.
- :func:`decode_attention`: the configured method for the T newest tokens, all at once: the step's
  plan fixes every shape, the step's inputs (tail slots, positions) and scalars (``n_mid``,
  ``live``) are device tensors, and the rule is :func:`~rcengine.engine.rule.attention.rc_state`.
  With a device selector and a tier the device reads directly, it does no host work per head or
  position and no host sync, so it can run inside a captured CUDA graph.

Queries ``(1, Hq, T, d)`` as the model hands them over; outputs ``(1, T, Hq, d)`` as transformers'
attention interface returns them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rule.attention import Completion, TokenSet, normalize, rc_state
from ..rule.feature_maps import CentroidFeatures
from . import kernels, stage
from .lanes import PAD_LANE
from .selectors import unit_blocks
from .state import KVState


def prefill_attention(k: torch.Tensor, v: torch.Tensor, query: torch.Tensor, scale: float) -> torch.Tensor:
    """``k, v: (1, Hkv, P, d)``: every token so far, this chunk's last; ``query: (1, Hq, C, d)``."""
    c, p = query.shape[2], k.shape[2]
    q_pos = torch.arange(p - c, p, device=query.device)
    mask = torch.arange(p, device=query.device)[None, :] <= q_pos[:, None]  # (C, P)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def decode_attention(state: KVState, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
    plan, step = state.plan, state.step
    _, hq, t, d = query.shape
    hkv = state.num_kv_heads
    qg = query[0].view(hkv, hq // hkv, t, d).permute(2, 0, 1, 3)  # (T, Hkv, G, d)
    anchors = [
        TokenSet(state.sink_k[layer], state.sink_v[layer]),
        TokenSet(state.tail.k[layer], state.tail.v[layer], state.tail.visible(step.q_pos, step.lanes if plan.lanes else None)),
    ]
    if state.probe is not None:  # evaluation only (bench-io): the queries and the anchors they see
        state.probe(layer, qg, anchors, step.q_pos)
    elif fusable(state, layer):
        out = fused_decode(state, layer, qg, scale)  # (T, Hkv, G, d)
        return out.reshape(1, t, hq, d).to(query.dtype)
    retrieved = read_mid(state, layer, qg) if plan.rows else None
    completion = Completion(state.maps[layer], state.summaries[layer]) if plan.method.completes else None
    out = normalize(rc_state(qg, anchors, scale, retrieved, completion))  # (T, Hkv, G, d)
    return out.reshape(1, t, hq, d).to(query.dtype)


def fusable(state: KVState, layer: int) -> bool:
    """Whether this layer's step can run as the fused kernels (see kernels.py): they read rows in
    place where the tier allows it, else from rows gathered for them (so every tier computes alike)."""
    plan = state.plan
    if not (plan.fused and kernels.available(state.device)) or (plan.lanes and plan.method.name == "dense"):
        return False  # (dense steps of several sequences read the mid-region once, through the PyTorch rule)
    return not plan.method.completes or (isinstance(state.maps[layer], CentroidFeatures) and state.clusters[layer] is not None)


def fused_decode(state: KVState, layer: int, qg: torch.Tensor, scale: float) -> torch.Tensor:
    """The step's rule for ``qg: (T, Hkv, G, d)`` through the fused kernels -> ``(T, Hkv, G, d)``."""
    plan, step, hkv = state.plan, state.step, state.num_kv_heads
    t, cap = qg.shape[0], plan.mid_cap
    rows = state.device_rows(layer)
    n_mid, live, rows_read, ids, unit = state.n_mid, state.live, plan.rows, None, 1
    table, table_block = None, 1
    resident = state.rows_resident()  # the rows the kernels read are in device memory
    clusters = state.clusters[layer] if plan.method.completes else None
    if plan.method.name == "dense" and rows is None and cap:  # a host read (eager steps only)
        k, v = state.tier.gather(layer, torch.arange(cap).expand(hkv, cap))
        rows, resident = torch.stack([k, v], dim=2).transpose(0, 1).contiguous(), True  # (cap, Hkv, 2, d)
    elif plan.method.selects and plan.units:
        sel = state.selectors[layer]
        if rows is not None and sel.on_device and not plan.lanes:  # rows read in place, by unit id
            ids, unit = sel.choose(qg, cap, plan.units, n_mid), sel.block
        elif rows is not None and sel.on_device and stage.ENABLED:  # several sequences: their units' union read once
            ids, unit = _pad_reads_first(state, sel.choose(qg, cap, plan.units, n_mid)), sel.block
            rows, table, state.union_rows[layer] = stage.stage_units(rows, ids, unit, live, n_mid)
            table_block, resident = unit, True
        elif state.reads_blocks_in_place():  # the disk tier: blocks read in place from its block cache
            tier = state.tier
            ids, unit = sel.choose(qg, cap, plan.units, n_mid), sel.block
            if plan.lanes:
                ids = _pad_reads_first(state, ids)
            tier.resolve(layer, *unit_blocks(ids, unit, tier.block_tokens, live, n_mid))
            rows, table, table_block = tier.cache.view, tier.cache.table[layer], tier.block_tokens
        else:  # gathered, then the kernels pointed at the gathered rows: a host read (eager steps only),
            # or the rows of several sequences' queries read in place, their union once (a host selector)
            tok, valid = sel.select(qg, cap, plan.units, live, n_mid)  # (T, Hkv, R)
            tok = tok.clamp(max=max(cap - 1, 0))
            if plan.lanes:
                tok = _pad_reads_first(state, tok)
            r = tok.shape[-1]
            flat = tok.transpose(0, 1).reshape(hkv, t * r)  # (Hkv, T R)
            if rows is not None and plan.lanes:
                token_major = (flat * hkv + torch.arange(hkv, device=flat.device)[:, None]).reshape(-1)
                kv, state.union_rows[layer] = union_read(rows.view(-1, rows.shape[-2] * rows.shape[-1]), token_major, cap * hkv)
                kv = kv.view(hkv, t * r, 2, -1)
            else:
                k, v = state.tier.gather(layer, flat)  # (Hkv, T R, d)
                kv = torch.stack([k, v], dim=2)
            rows, resident = kv.transpose(0, 1).contiguous(), True  # (T R, Hkv, 2, d)
            local = (torch.arange(t, device=tok.device)[:, None, None] * r + torch.arange(r, device=tok.device)).expand(t, hkv, r)
            ids = torch.where(valid, local, t * r)  # invalid ones point past the gathered rows
            n_mid = torch.full((), t * r, dtype=torch.int64, device=tok.device)
            live = torch.full((), r, dtype=torch.int64, device=tok.device)
            if clusters is not None:
                clusters = clusters.gather(1, flat.to(clusters.device))
    completes = plan.method.completes
    return kernels.fused_attention(
        qg, state.sink_k[layer][0], state.sink_v[layer][0], state.tail.k[layer][0], state.tail.v[layer][0], state.tail.pos,
        step.q_pos, rows if rows_read else None, ids, unit, rows_read, n_mid, live, plan.method.name == "dense", scale,
        centroids=state.maps[layer].centroids if completes else None, summary=state.summaries[layer] if completes else None,
        clusters=clusters, table=table, table_block=table_block,
        tail_lane=state.tail.lane if plan.lanes else None, q_lane=step.lanes if plan.lanes else None, resident=resident,
    )


def read_mid(state: KVState, layer: int, qg: torch.Tensor) -> TokenSet:
    """The mid tokens the step's queries ``qg: (T, Hkv, G, d)`` read: every row (dense), or the
    selector's choice per KV head and position, ``(T, Hkv, R, d)`` with their validity."""
    plan, hkv = state.plan, state.num_kv_heads
    t, cap = qg.shape[0], plan.mid_cap
    rows = state.device_rows(layer)
    if plan.method.name == "dense":
        if rows is not None:  # (cap, Hkv, 2, d), read in place
            if plan.lanes:  # read once, whatever the number of queries
                state.union_rows[layer] = torch.tensor(cap * hkv)
            kv = rows[:cap].transpose(0, 1)[None]  # (1, Hkv, cap, 2, d)
            valid = (torch.arange(cap, device=qg.device) < state.n_mid)[None, None]  # (1, 1, cap)
            return TokenSet(kv[..., 0, :], kv[..., 1, :], valid)
        k, v = state.tier.gather(layer, torch.arange(cap).expand(hkv, cap))  # host read: eager steps only
        return TokenSet(k[None], v[None])
    ids, valid = state.selectors[layer].select(qg, cap, plan.units, state.live, state.n_mid)  # (T, Hkv, R)
    ids = ids.clamp(max=max(cap - 1, 0))  # padding past the mid-region stays inside the buffers
    if plan.lanes:
        ids = _pad_reads_first(state, ids)
    r = ids.shape[-1]
    if rows is None and state.reads_blocks_in_place():  # the disk tier's block cache, read in place
        tier = state.tier
        b = tier.block_tokens
        slots = tier.resolve(layer, ids // b, valid)  # (T, Hkv, R)
        kv = tier.cache.view[slots.clamp(min=0), ids % b]  # (T, Hkv, R, 2, d)
        return TokenSet(kv[..., 0, :], kv[..., 1, :], valid & (slots >= 0))
    if rows is not None:
        flat = (ids * hkv + torch.arange(hkv, device=ids.device)[:, None]).reshape(-1)  # token-major rows
        rows = rows.view(-1, rows.shape[-2] * rows.shape[-1])
        if plan.lanes:  # several sequences' queries: each row any of them selected is read once
            kv, state.union_rows[layer] = union_read(rows, flat, cap * hkv)
            kv = kv.view(t, hkv, r, 2, -1)
        else:
            kv = rows.index_select(0, flat).view(t, hkv, r, 2, -1)
        return TokenSet(kv[..., 0, :], kv[..., 1, :], valid)
    k, v = state.tier.gather(layer, ids.transpose(0, 1).reshape(hkv, t * r))  # host read: eager steps only
    return TokenSet(k.view(hkv, t, r, -1).transpose(0, 1), v.view(hkv, t, r, -1).transpose(0, 1), valid)


def union_read(rows: torch.Tensor, flat: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows: (>= total, F)`` read at ``flat: (M,)`` (ids < ``total``, repeats allowed), each
    distinct row once -> the rows in ``flat``'s order ``(M, F)``, and how many distinct rows were
    read (a device scalar).  Static shapes and no host sync (a step of several sequences can be
    captured): the distinct ids are marked, compacted into M slots (the slots past their count
    read row 0 again), read, and scattered back by rank."""
    mark = torch.zeros(total, dtype=torch.bool, device=flat.device)
    mark.index_fill_(0, flat, True)  # (a scalar fill: no host tensor to copy inside a captured graph)
    union = torch.nonzero_static(mark, size=flat.numel(), fill_value=0).view(-1)  # (M,) distinct ids first
    rank = mark.cumsum(0) - 1  # (total,) each marked id's slot in ``union``
    return rows.index_select(0, union)[rank[flat]], mark.sum()


def _pad_reads_first(state: KVState, ids: torch.Tensor) -> torch.Tensor:
    """``ids: (T, ...)`` with the rows of a step's padding tokens (lane ``PAD_LANE``) replaced by
    its first token's: padding reads nothing more than the step does."""
    pad = (state.step.lanes == PAD_LANE).view(-1, *([1] * (ids.dim() - 1)))
    return torch.where(pad, ids[:1], ids)

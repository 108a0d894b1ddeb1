"""What one attention layer computes under rcengine, in prefill and in decode.

- ``prefill_attention``: exact causal attention of a chunk's queries over everything so far.
- ``decode_attention``: the configured method (dense / sink-tail / topk / rc) for the T newest
  tokens, each query seeing the tail only up to its own position.

Queries ``(1, Hq, T, d)`` as the model hands them over; outputs ``(1, T, Hq, d)`` as transformers'
attention interface returns them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import completion_state, exact_state, group_queries, merge_states, normalize, ungroup
from .budget import retrieval_count
from .cache import RCCache


def prefill_attention(cache: RCCache, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
    k, v = cache.state[layer].prefill.view()  # (1, Hkv, P, d), this chunk included
    c, p = query.shape[2], k.shape[2]
    q_pos = torch.arange(p - c, p, device=query.device)
    mask = torch.arange(p, device=query.device)[None, :] <= q_pos[:, None]  # (C, P)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def decode_attention(cache: RCCache, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
    cfg = cache.config
    st = cache.state[layer]
    hkv = cache.num_kv_heads
    tail_k, tail_v = st.tail.view()
    new = query.shape[2]
    n_mid = cache.tier.num_rows(layer)
    if cfg.method in ("topk", "rc"):
        count = retrieval_count(cfg.budget, n_mid)
    else:
        count = 0
    outs = []
    for t in range(new):
        qg = group_queries(query[:, :, t], hkv)  # (1, Hkv, G, d)
        visible = tail_k.shape[2] - new + t + 1
        state = merge_states(
            exact_state(qg, st.sink_k, st.sink_v, scale),
            exact_state(qg, tail_k[:, :, :visible], tail_v[:, :, :visible], scale),
        )
        if cache.probe is not None:  # evaluation only (bench-io): the query and the anchors it sees
            cache.probe(layer, qg, st.sink_k, st.sink_v, tail_k[:, :, :visible], tail_v[:, :, :visible])
        if cfg.method == "dense" and n_mid:
            ids = torch.arange(n_mid).expand(hkv, n_mid)
            k_all, v_all = cache.tier.gather(layer, ids)
            state = merge_states(state, exact_state(qg, k_all[None], v_all[None], scale))
        elif cfg.method in ("topk", "rc") and n_mid:
            k_r = v_r = valid = None
            if count:
                ids, valid = cache.index.search(layer, qg[0], count)
                k_r, v_r = cache.tier.gather(layer, ids)  # (Hkv, K, d) on the compute device
                k_r, v_r, valid = k_r[None], v_r[None], valid[None].to(query.device)
                state = merge_states(state, exact_state(qg, k_r, v_r, scale, valid))
            if cfg.method == "rc":
                fmap = st.feature_map
                ak_r = None if k_r is None else fmap.key_logits(k_r)
                state = merge_states(state, completion_state(fmap.query_logits(qg), st.summary, ak_r, v_r, valid))
        outs.append(ungroup(normalize(state)))  # (1, Hq, d)
    return torch.stack(outs, dim=1).to(query.dtype)  # (1, T, Hq, d)

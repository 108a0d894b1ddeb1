"""What an answer cost: bytes read per tier (logical and physical), selection reads, memory held,
times; all from the byte meter and the document's state."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ...storage import ByteMeter, Counters
from ..decode.state import KVState


def answer_stats(state: KVState, meter: ByteMeter, first_step: int, queries: int, steps: int, prefill_ms: float,
                 question_ms: float, decode_s: float, share: tuple[float, float] = (1.0, 1.0)) -> dict[str, Any]:
    """Bytes read from meter step ``first_step`` on by ``queries`` query tokens (the question's,
    if any, in step ``first_step``, then ``steps`` decode steps), per tier, and what they amount to
    in tokens per KV head and layer.  An answer of a batch (``Document.ask_many``) takes ``share``
    of what the batch's steps read: its fraction of their queries, and of their decode steps' (each
    query asks for as many rows, so its logical bytes are exact; physical ones, read once for the
    union, are apportioned the same way)."""
    cfg = state.config
    every, decoding = share
    remote = getattr(state.tier, "remote", False)  # a store at an s3:// URL: what came over the network, in how many GETs
    by_tier = {}
    for t in meter.tiers(since=first_step):
        c = _scaled(meter.totals(tier=t, since=first_step), every)
        by_tier[t] = {"logical": c.logical, "physical": c.physical, "h2d": c.h2d}
        if t == "disk":
            # physical: bytes read from the store's files; storage_device_read: what the storage
            # device delivered for them (0 when the OS page cache held the blocks); block cache:
            # blocks found in (hits) or missing from (misses) rcengine's own LRU cache.
            by_tier[t].update({"storage_device_read": c.disk_read, "block_cache_hits": c.cache_hits,
                               "block_cache_misses": c.cache_misses})
            if remote:
                by_tier[t].update({"network": c.net_bytes, "network_gets": c.net_gets})
    index = {t: round(every * meter.index_totals(since=first_step, tier=t).bytes) for t in meter.index_tiers(since=first_step)}
    decode_from = first_step + (1 if queries > steps else 0)  # decode steps alone (one query each)
    per_step = {}
    for t in meter.tiers(since=decode_from):
        c = _scaled(meter.totals(tier=t, since=decode_from), decoding)
        per_step[t] = {"logical": c.logical / steps if steps else 0.0, "physical": c.physical / steps if steps else 0.0}
        if t == "disk" and remote:
            per_step[t].update({"network": c.net_bytes / steps if steps else 0.0, "network_gets": c.net_gets / steps if steps else 0.0})
    index_per_step = decoding * meter.index_totals(since=decode_from).bytes / steps if steps else 0.0
    layers, heads = state.num_layers, state.num_kv_heads
    row = state.tier.layout.row_bytes
    logical = sum(v["logical"] for v in by_tier.values())
    tokens_read = logical / (row * layers * heads * queries) if queries else 0.0
    mid = state.mid_len
    method = state.method
    return {
        "method": cfg.method, "offload": cfg.offload, "budget": cfg.budget if method.selects else None,
        "selector": cfg.selector if method.selects else None,
        "retrieved_per_head": method.count(cfg.budget, mid), "mid_tokens": mid, "queries": queries, "decode_steps": steps,
        "bytes": {"logical": logical, "physical": sum(v["physical"] for v in by_tier.values()), "by_tier": by_tier,
                  "index": sum(index.values()), "index_by_tier": index},
        "bytes_per_query": logical / queries if queries else 0.0,
        "bytes_per_decode_step": {"by_tier": per_step, "index": index_per_step},
        "token_equivalent": {"support": tokens_read, "bytes": tokens_read + state.summary_bytes_per_head() / row},
        "memory_bytes": state.device_bytes(),
        "timings_ms": {"prefill": prefill_ms, "question": question_ms,
                       "decode_per_token": 1e3 * decode_s / steps if steps else None},
    }


def _scaled(c: Counters, share: float) -> Counters:
    """``share`` of every counter (rounded to whole bytes, requests and blocks)."""
    if share == 1.0:
        return c
    return Counters(**{f.name: round(share * getattr(c, f.name)) for f in fields(c)})

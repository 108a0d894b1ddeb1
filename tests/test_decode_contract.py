"""The decode path against the rule: every method x selector x tier, at a budget below 1, each
layer's output for every query (a batched question, then single decode steps) compared with the
rule computed in float64 from the document's own anchors, mid-region and summaries, with exact
search (for the block selector: exact block bounds) standing in for the engine's selection."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import rcengine.engine.hf.integration as integration
from conftest import output_tolerance
from rcengine.engine.config import EngineConfig
from rcengine.engine.qa.engine import Engine
from rcengine.engine.rule.attention import Completion, TokenSet, group_queries, normalize, rc_state
from rcengine.engine.rule.budget import retrieval_count
from rcengine.engine.rule.estimators import feature_map_from_tensors, feature_map_tensors
from rcengine.engine.rule.summary import Summary
from rcengine.engine.sampling import SamplingConfig
from tiny_models import save_tiny_model

BUDGET, BLOCK, SINK, TAIL = 0.1, 8, 4, 16


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("contract") / "llama", "llama")


def _reference_ids(qg: torch.Tensor, k_mid: torch.Tensor, selector: str, method: str) -> torch.Tensor:
    """Mid rows one query reads: ``qg: (1, Hkv, G, d)``, ``k_mid: (1, Hkv, n, d)`` float64 -> ``(1, Hkv, R)``."""
    n = k_mid.shape[2]
    if method == "dense":
        return torch.arange(n).expand(1, k_mid.shape[1], n)
    if method == "sink-tail":
        return torch.zeros(1, k_mid.shape[1], 0, dtype=torch.int64)
    count = retrieval_count(BUDGET, n)
    if selector == "exact-block":  # blocks ranked by their best token
        blocks = math.ceil(n / BLOCK)
        s = torch.matmul(qg, k_mid.transpose(-1, -2)).amax(dim=2)
        s = torch.cat([s, s.new_full((*s.shape[:2], blocks * BLOCK - n), -math.inf)], -1).view(*s.shape[:2], blocks, BLOCK).amax(-1)
        chosen = s.topk(math.ceil(count / BLOCK), dim=-1).indices
        ids = (chosen[..., None] * BLOCK + torch.arange(BLOCK)).flatten(-2)
        assert bool((ids < n).all())  # (the mid-region is whole blocks here)
        return ids.sort(dim=-1).values
    if selector != "block":
        return torch.matmul(qg, k_mid.transpose(-1, -2)).amax(dim=2).topk(count, dim=-1).indices
    blocks = math.ceil(n / BLOCK)
    pad = blocks * BLOCK - n
    hi = torch.cat([k_mid, k_mid.new_full((*k_mid.shape[:2], pad, k_mid.shape[3]), -math.inf)], 2)
    lo = torch.cat([k_mid, k_mid.new_full((*k_mid.shape[:2], pad, k_mid.shape[3]), math.inf)], 2)
    hi = hi.view(*k_mid.shape[:2], blocks, BLOCK, -1).amax(3)
    lo = lo.view(*k_mid.shape[:2], blocks, BLOCK, -1).amin(3)
    bound = (torch.matmul(qg.clamp_min(0), hi.transpose(-1, -2)) + torch.matmul(qg.clamp_max(0), lo.transpose(-1, -2))).amax(2)
    chosen = bound.topk(math.ceil(count / BLOCK), dim=-1).indices  # (1, Hkv, blocks chosen)
    ids = (chosen[..., None] * BLOCK + torch.arange(BLOCK)).flatten(-2)
    return ids.sort(dim=-1).values


@pytest.mark.parametrize("tier", ["cpu", "disk", "device"])
@pytest.mark.parametrize("selector", ["exact", "exact-block", "block", "faiss"])
@pytest.mark.parametrize("method", ["dense", "sink-tail", "topk", "rc"])
def test_decode_matches_the_rule_in_float64(model, method, selector, tier, monkeypatch, tmp_path):
    cfg = EngineConfig(method=method, budget=BUDGET, selector=selector, select_block=BLOCK, offload=tier, sink=SINK, tail=TAIL,
                       spill=4, scratch_dir=str(tmp_path), graphs=False)
    engine = Engine.load(model, cfg, show_progress=False)
    doc = engine.prefill(torch.randint(3, 300, (300,), generator=torch.Generator().manual_seed(21)).tolist())
    calls = []

    def recording(state, layer, query, scale):  # noqa: ANN001, ANN202
        out = decode_attention(state, layer, query, scale)
        tail = state.tail
        calls.append((layer, query.clone(), out.clone(), tail.k[layer].clone(), tail.v[layer].clone(), tail.pos.clone(), scale))
        return out

    decode_attention = integration.decode_attention
    monkeypatch.setattr(integration, "decode_attention", recording)
    doc.ask(torch.randint(3, 300, (5,), generator=torch.Generator().manual_seed(22)).tolist(),
            SamplingConfig(max_new_tokens=3, ignore_eos=True))
    st = doc.state
    assert len(calls) == st.num_layers * 3  # the 5-token question in one step, then two decode steps
    # The reference runs on the CPU in float64, from the engine's own state.
    mids = [tuple(x.double().cpu() for x in st.read_mid(layer)) for layer in range(st.num_layers)]
    maps = [None if m is None else feature_map_from_tensors(cfg.estimator.kind, feature_map_tensors(m)) for m in st.maps]
    summaries = {}
    for layer, fmap in enumerate(maps):
        if fmap is not None:  # the same map, its summary rebuilt in float64 from the mid-region
            s = Summary.empty(1, st.num_kv_heads, fmap.num_features, st.head_dim, dtype=torch.float64)
            s.fold(fmap.key_logits(mids[layer][0]), mids[layer][1])
            summaries[layer] = s
    sink_k, sink_v = st.sink_k.double().cpu(), st.sink_v.double().cpu()
    for layer, query, out, tail_k, tail_v, tail_pos, scale in calls:
        query, tail_k, tail_v, tail_pos = query.cpu(), tail_k.cpu(), tail_v.cpu(), tail_pos.cpu()
        k_mid, v_mid = mids[layer]
        t = query.shape[2]
        first = int(tail_pos.max()) - t + 1
        for i in range(t):
            q = group_queries(query[0, :, i][None].double(), st.num_kv_heads)  # (1, Hkv, G, d)
            seen = (tail_pos >= 0) & (tail_pos <= first + i)
            anchors = [TokenSet(sink_k[layer], sink_v[layer]), TokenSet(tail_k[:, :, seen].double(), tail_v[:, :, seen].double())]
            ids = _reference_ids(q, k_mid, selector, method)
            take = lambda x: torch.gather(x, 2, ids[..., None].expand(*ids.shape, x.shape[-1]))  # noqa: E731
            retrieved = TokenSet(take(k_mid), take(v_mid)) if ids.shape[-1] else None
            completion = Completion(maps[layer], summaries[layer]) if method == "rc" else None
            ref = normalize(rc_state(q, anchors, scale, retrieved, completion)).reshape(-1, st.head_dim)
            got = out[0, i].double().cpu()
            tol = output_tolerance(query.dtype) * ref.abs().max()
            assert (got - ref).abs().max() <= tol, (layer, i, (got - ref).abs().max().item(), tol.item())
    doc.close()

"""Property tests: every method stays finite and inside the values' convex hull bound, at extreme
scores, empty regions, K = 0 and K = |M|, and in bf16."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tolerance
from rcengine.engine import EstimatorSpec, LayerContext, retrieval_count

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@st.composite
def contexts(draw):
    hkv = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 3]))
    d = draw(st.sampled_from([8, 16]))
    n = draw(st.integers(1, 96))
    sink = draw(st.integers(0, 8))
    tail = draw(st.integers(0, 16))
    if sink + tail == 0:
        tail = 1  # anchors are never empty in the engine (the current token is in the tail)
    magnitude = draw(st.sampled_from([1.0, 1e2, 1e4]))  # target |score| = |q.k| / sqrt(d)
    kind = draw(st.sampled_from(["favor", "centroid"]))
    dtype = draw(st.sampled_from(list(DTYPES)))
    budget = draw(st.sampled_from([0.0, 0.01, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return hkv, g, d, n, sink, tail, magnitude, kind, dtype, budget, seed


@settings(max_examples=120, deadline=None)
@given(contexts())
def test_methods_finite_and_bounded(args):
    hkv, g, d, n, sink, tail, magnitude, kind, dtype, budget, seed = args
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hkv * g, d, generator=gen)
    k = torch.randn(1, hkv, n, d, generator=gen)
    v = torch.randn(1, hkv, n, d, generator=gen)
    # Unit-norm rows scaled so that |q.k| / sqrt(d) reaches `magnitude` for aligned pairs.
    q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(magnitude) * d**0.25
    k = k / k.norm(dim=-1, keepdim=True) * math.sqrt(magnitude) * d**0.25
    q, k, v = q.to(DTYPES[dtype]), k.to(DTYPES[dtype]), v.to(DTYPES[dtype])
    ctx = LayerContext.build(k, v, sink, tail, EstimatorSpec(kind, 8, seed=seed), chunk=16)
    count = retrieval_count(budget, ctx.mid_len)
    v_max = v.float().norm(dim=-1).max()
    for method in ("dense", "sink-tail", "topk", "rc"):
        out = ctx.attend(q, method, count)
        assert out.shape == (1, hkv * g, d)
        assert torch.isfinite(out).all(), method
        assert (out.norm(dim=-1) <= v_max * (1 + 1e-4)).all(), method
    if count == ctx.mid_len:  # everything retrieved: exactly dense
        ref = ctx.attend(q.double(), "dense")
        tol = tolerance(q.float(), k.float(), v.float()) if dtype == "fp32" else 1e-2 * float(v_max)
        for method in ("topk", "rc"):
            assert (ctx.attend(q, method, count).double() - ref).abs().max() <= tol, method


def test_empty_mid_region_and_no_retrieval():
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 16, generator=gen), torch.randn(1, 2, 10, 16, generator=gen), torch.randn(1, 2, 10, 16, generator=gen)
    for kind in ("favor", "centroid"):
        ctx = LayerContext.build(k, v, sink=4, tail=6, spec=EstimatorSpec(kind, 8))
        assert ctx.mid_len == 0
        dense = ctx.attend(q, "dense")
        for method in ("sink-tail", "topk", "rc"):
            assert torch.allclose(ctx.attend(q, method, 0), dense, atol=1e-6)

"""Top-K in two stages (selectors.top_units) against torch.topk in one: the same set, best first."""

from __future__ import annotations

import math

import pytest
import torch

from rcengine.engine.decode import selectors

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,count,invalid", [
    (8192, 82, 0),      # the block selector at 128K, 1 %: 8 chunks of 1024
    (8192 + 300, 82, 0),  # a padded last chunk
    (5000, 100, 4400),  # fewer real scores than count: -inf entries chosen after every real one
    (40000, 700, 0),    # a longer chunk (8 count, rounded up to 8192)
    (3000, 82, 0),      # under four chunks: one stage
])
def test_two_stage_top_k_is_the_one_stage_top_k(gen, device, n, count, invalid):
    s = torch.randn(3, 8, n, generator=gen).to(device)
    if invalid:
        s[..., n - invalid :] = -math.inf
    got = selectors.top_units(s, count)
    want = s.topk(count, dim=-1)
    assert got.shape == (3, 8, count) and bool((got >= 0).all()) and bool((got < n).all())
    real = min(count, n - invalid)
    # best first: the chosen scores are the top-k values in order
    torch.testing.assert_close(s.gather(-1, got)[..., :real], want.values[..., :real], rtol=0, atol=0)
    # the same set (random floats: no ties among the real ones)
    assert torch.equal(got[..., :real].sort(dim=-1).values, want.indices[..., :real].sort(dim=-1).values)


def test_one_stage_when_disabled(monkeypatch):
    monkeypatch.setattr(selectors, "TOPK_CHUNK", 0)
    s = torch.randn(2, 1, 10000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(selectors.top_units(s, 50), s.topk(50, dim=-1).indices)

"""Budget accounting, summary serialisation, and estimator specs."""

from __future__ import annotations

import pytest
import torch

from rcengine.engine import EstimatorSpec, FavorFeatures, Summary, TokenCost, retrieval_count


@pytest.mark.parametrize(
    ("budget", "mid", "expected"),
    [(0.01, 300, 3), (0.01, 301, 4), (0.005, 1000, 5), (0.0, 50, 0), (1.0, 77, 77), (0.02, 0, 0)],
)
def test_retrieval_count(budget, mid, expected):
    assert retrieval_count(budget, mid) == expected


def test_budget_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="budget"):
        retrieval_count(1.5, 10)


def test_token_cost_accountings():
    # d = 128, bf16 KV (512 B a token), r = 64 fp32 features: 64 * 130 * 4 = 33280 B = 65 tokens.
    cost = TokenCost(head_dim=128, kv_bytes=2, summary_bytes=64 * 130 * 4)
    assert cost.token_bytes == 512
    assert cost.summary_tokens == 65.0
    assert cost.retrieved(0.01, 100_000, "support") == 1000
    assert cost.retrieved(0.01, 100_000, "bytes") == 935
    assert cost.retrieved(0.01, 1000, "bytes") == 0  # never negative
    with pytest.raises(ValueError, match="accounting"):
        cost.retrieved(0.01, 10, "other")


def test_summary_bytes_match_design():
    s = Summary.empty(1, 2, 64, 128)
    assert s.nbytes_per_head() == 64 * 130 * 4


def test_summary_state_dict_round_trip(gen):
    fmap = FavorFeatures.create(2, 16, 8, seed=0)
    s = Summary.empty(1, 2, 8, 16)
    s.fold(fmap.key_logits(torch.randn(1, 2, 30, 16, generator=gen)), torch.randn(1, 2, 30, 16, generator=gen))
    back = Summary.from_state_dict({k: v.clone() for k, v in s.state_dict().items()})
    for name, value in s.state_dict().items():
        assert torch.equal(getattr(back, name), value)
    broken = s.state_dict() | {"u": torch.zeros(3)}
    with pytest.raises(ValueError, match="u has shape"):
        Summary.from_state_dict(broken)
    with pytest.raises(ValueError, match="lacks S"):
        Summary.from_state_dict({k: v for k, v in s.state_dict().items() if k != "S"})


def test_favor_is_seeded():
    a = FavorFeatures.create(2, 16, 32, seed=7)
    assert torch.equal(a.W, FavorFeatures.create(2, 16, 32, seed=7).W)
    assert not torch.equal(a.W, FavorFeatures.create(2, 16, 32, seed=8).W)
    # Rows within a block of d are orthogonal.
    w = a.W[0, :16].double()
    gram = w @ w.T
    assert torch.allclose(gram - torch.diag(torch.diag(gram)), torch.zeros_like(gram), atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [({"kind": "lsh"}, "unknown"), ({"num_features": 7}, "even"), ({"num_features": 0}, ">= 1")])
def test_estimator_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EstimatorSpec(**kwargs)

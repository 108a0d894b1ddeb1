"""Exact Top-K selection per KV head: the reference that key indexes are tested against.

Retrieval is per KV head: the G query heads of a group share one retrieved set, ranked by the
largest score any of them gives a token.
"""

from __future__ import annotations

import torch


def group_scores(qg: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``qg: (B, Hkv, G, d)``, ``k: (B, Hkv, n, d)`` -> ``(B, Hkv, n)``: max over the group of q.k."""
    dt = torch.float64 if torch.float64 in (qg.dtype, k.dtype) else torch.float32
    return torch.matmul(qg.to(dt), k.to(dt).transpose(-1, -2)).amax(dim=-2)


def group_topk(qg: torch.Tensor, k: torch.Tensor, count: int) -> torch.Tensor:
    """Ids ``(B, Hkv, count)`` of the ``count`` keys with the largest group score, best first."""
    count = min(count, k.shape[-2])
    return group_scores(qg, k).topk(count, dim=-1).indices


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids: (B, Hkv, K)`` of ``x: (B, Hkv, n, d)`` -> ``(B, Hkv, K, d)``."""
    return torch.gather(x, 2, ids[..., None].expand(*ids.shape, x.shape[-1]))

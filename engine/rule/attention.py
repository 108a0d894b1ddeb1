"""The attention rule for one decode step: dense, Top-K only, and retrieval-completion.

Pure tensor functions, any device.  The rule is assembled in one place, :func:`rc_state`: exact
attention over the anchor and retrieved token sets (one softmax state), plus the summary's estimate
of the unread mid tokens with the retrieved share subtracted, merged before one normalisation.
Decoding, bench-io's probe, the in-memory reference and the tests all call it.  Shapes:

- ``q``: ``(B, Hq, d)`` decode queries, one per query head.  In decoding, B is the T query
  positions of one sequence.
- keys / values of a token set: ``(B, Hkv, n, d)``, post-RoPE exactly as the model stores them; a
  set shared by every query (the anchors) has batch 1.
- ``Hq = G * Hkv``: the G query heads of a KV head share its keys (GQA).  Internally queries are
  grouped as ``qg: (B, Hkv, G, d)``.

Arithmetic runs in float32, or float64 when any input is float64 (the references).  Every partial
result is an :class:`AttnState` relative to its own log-scale, so no exponent is ever positive and
states merge exactly like flash-attention's split-KV partials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .feature_maps import FeatureMap
from .summary import Summary

# Drop the completion when the residual mass is below this fraction of the summary's total mass
# (by the summary's own measure): the subtraction has then cancelled to noise.
RESIDUAL_DROP_FRACTION = 1e-4


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``q: (B, Hq, d)`` -> ``(B, Hkv, G, d)``; query head ``h`` uses KV head ``h // G``."""
    b, hq, d = q.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads do not split into {num_kv_heads} KV-head groups")
    return q.reshape(b, num_kv_heads, hq // num_kv_heads, d)


def ungroup(o: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, G, d)`` -> ``(B, Hq, d)``."""
    b, hkv, g, d = o.shape
    return o.reshape(b, hkv * g, d)


@dataclass(frozen=True)
class AttnState:
    """Unnormalised attention over a token set, relative to the log-scale ``m``.

    - ``num: (B, Hkv, G, d)`` = sum_j e^{s_j - m} v_j
    - ``den: (B, Hkv, G)``    = sum_j e^{s_j - m}
    - ``m:   (B, Hkv, G)``    log-scale; ``-inf`` for an empty set (then num = den = 0)
    """

    num: torch.Tensor
    den: torch.Tensor
    m: torch.Tensor

    @staticmethod
    def empty(qg: torch.Tensor, dtype: torch.dtype) -> "AttnState":
        b, h, g, d = qg.shape
        zeros = qg.new_zeros((b, h, g), dtype=dtype)
        return AttnState(qg.new_zeros((b, h, g, d), dtype=dtype), zeros, zeros - math.inf)


@dataclass(frozen=True)
class TokenSet:
    """Tokens a query attends to exactly: ``k, v: (B or 1, Hkv, n, d)``; ``valid: (B or 1, Hkv, n)``
    bool marks the tokens that take part (None = all)."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor | None = None


@dataclass(frozen=True)
class Completion:
    """The estimate of the unread mid tokens: a feature map, the summary of the whole mid-region
    built with its key features, and ``gamma``, a log-mass calibration broadcastable to
    ``(B, Hkv, G)`` (0 for untrained maps)."""

    feature_map: FeatureMap
    summary: Summary
    gamma: torch.Tensor | float = 0.0


def _bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x: (B, H, G, a) @ y: (B or 1, H, a, b) -> (B, H, G, b)``.  A y of batch 1 shared by B > 1
    queries is multiplied once for all of them (matmul's broadcasting would copy it B times)."""
    b, h, g, a = x.shape
    if y.shape[0] == 1 and b > 1:
        out = torch.matmul(x.transpose(0, 1).reshape(h, b * g, a), y[0])  # (H, B G, b)
        return out.view(h, b, g, -1).transpose(0, 1)
    return torch.matmul(x, y)


def exact_state_of(qg: torch.Tensor, sets: Sequence[TokenSet], scale: float) -> AttnState:
    """Exact attention state of ``qg: (B, Hkv, G, d)`` over the union of disjoint token ``sets``:
    one softmax (one log-scale) over all of them."""
    dt = compute_dtype(qg, *(t for s in sets for t in (s.k, s.v)))
    sets = [s for s in sets if s.k.shape[-2] > 0]
    if not sets:
        return AttnState.empty(qg, dt)
    q = qg.to(dt)
    scores = []
    for ts in sets:
        s = _bmm(q, ts.k.to(dt).transpose(-1, -2)) * scale  # (B, Hkv, G, n)
        if ts.valid is not None:
            s = s.masked_fill(~ts.valid[:, :, None, :], -math.inf)
        scores.append(s)
    s = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)
    m = s.amax(dim=-1)  # (B, Hkv, G)
    p = torch.exp(s - _finite_or_zero(m)[..., None])  # masked tokens -> 0
    num = None
    for part, ts in zip(p.split([ts.k.shape[-2] for ts in sets], dim=-1), sets, strict=True):
        term = _bmm(part, ts.v.to(dt))
        num = term if num is None else num + term
    return AttnState(num, p.sum(dim=-1), m)


def exact_state(
    qg: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None = None,
) -> AttnState:
    """Exact attention state of ``qg: (B, Hkv, G, d)`` over ``k, v: (B, Hkv, n, d)``.

    ``valid: (B, Hkv, n)`` bool marks the tokens that take part (None = all).
    """
    return exact_state_of(qg, [TokenSet(k, v, valid)], scale)


def merge_states(a: AttnState, b: AttnState) -> AttnState:
    """Log-sum-exp merge of two states over disjoint token sets (order-independent)."""
    m = torch.maximum(a.m, b.m)
    m_ref = _finite_or_zero(m)
    fa = torch.exp(a.m - m_ref)  # <= 1; 0 for an empty side
    fb = torch.exp(b.m - m_ref)
    return AttnState(
        a.num * fa[..., None] + b.num * fb[..., None],
        a.den * fa + b.den * fb,
        m,
    )


def normalize(state: AttnState) -> torch.Tensor:
    """One normalisation: ``num / den`` -> ``(B, Hkv, G, d)``; 0 where the set is empty."""
    den = state.den[..., None]
    return torch.where(den > 0, state.num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def completion_state(
    aq: torch.Tensor,
    summary: Summary,
    ak_ret: torch.Tensor | None = None,
    v_ret: torch.Tensor | None = None,
    ret_valid: torch.Tensor | None = None,
    gamma: torch.Tensor | float = 0.0,
) -> AttnState:
    """Estimate of the attention over the unread mid tokens U = M \\ R, as an AttnState.

    - ``aq: (B, Hkv, G, r)`` query log-features a(q) (each query head with its own map).
    - ``summary``: built over the whole mid-region M.
    - ``ak_ret: (B, Hkv, K, r)`` key log-features of the retrieved tokens R (a subset of M),
      ``v_ret: (B, Hkv, K, d)`` their values, ``ret_valid: (B, Hkv, K)`` which are real.
      Their share is subtracted from the summary, so it is not counted twice.
    - ``gamma``: log-mass calibration, broadcastable to ``(B, Hkv, G)`` (0 for untrained maps).

    Safety: the estimate is dropped where the residual mass is not positive or has
    cancelled below ``RESIDUAL_DROP_FRACTION`` of the total, and its mean value is shrunk onto the
    ball of radius ``v_max`` (the largest value norm in M) when it leaves it.
    """
    dt = summary.S.dtype
    g = aq.to(dt) + summary.beta[:, :, None, :]  # (B, Hkv, G, r); -inf on empty features
    alpha = g.amax(dim=-1)  # (B, Hkv, G)
    w = torch.exp(g - _finite_or_zero(alpha)[..., None])  # in [0, 1]
    den_all = torch.einsum("bhgr,bhr->bhg", w, summary.u)
    num = torch.einsum("bhgr,bhrd->bhgd", w, summary.S)
    den = den_all
    if ak_ret is not None and ak_ret.shape[-2] > 0:
        e_ret = torch.exp(ak_ret.to(dt) - _finite_or_zero(summary.beta)[:, :, None, :])
        if ret_valid is not None:
            e_ret = e_ret * ret_valid[..., None].to(dt)
        lam = torch.einsum("bhgr,bhkr->bhgk", w, e_ret)  # (B, Hkv, G, K)
        den = den_all - lam.sum(dim=-1)
        num = num - torch.matmul(lam, v_ret.to(dt))
    ok = (den > 0) & (den > RESIDUAL_DROP_FRACTION * den_all) & torch.isfinite(alpha)
    den_safe = torch.where(ok, den, 1.0)
    mean_norm = torch.linalg.vector_norm(num, dim=-1) / den_safe
    v_max = summary.v_max[:, :, None].to(dt)
    shrink = torch.where(mean_norm > v_max, v_max / mean_norm.clamp_min(1e-30), 1.0)
    num = torch.where(ok[..., None], num * shrink[..., None], 0.0)
    den = torch.where(ok, den, 0.0)
    m = torch.where(ok, alpha + gamma, -math.inf)
    return AttnState(num, den, m)


def rc_state(
    qg: torch.Tensor,
    anchors: Sequence[TokenSet],
    scale: float,
    retrieved: TokenSet | None = None,
    completion: Completion | None = None,
) -> AttnState:
    """The rule, unnormalised: exact attention over ``anchors`` and ``retrieved`` (one softmax
    state), merged with ``completion``'s estimate of the mid tokens not retrieved (the retrieved
    share subtracted from the summary, so nothing is counted twice).  Without ``completion`` this
    is Top-K (or, with every mid token retrieved, dense) attention.  ``qg: (B, Hkv, G, d)``."""
    exact = exact_state_of(qg, [*anchors, *([retrieved] if retrieved is not None else [])], scale)
    if completion is None:
        return exact
    fmap = completion.feature_map
    ak = v = valid = None
    if retrieved is not None:
        ak, v, valid = fmap.key_logits(retrieved.k), retrieved.v, retrieved.valid
    estimate = completion_state(fmap.query_logits(qg), completion.summary, ak, v, valid, completion.gamma)
    return merge_states(exact, estimate)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention over every token.  ``q: (B, Hq, d)``, ``k, v: (B, Hkv, N, d)`` ->
    ``(B, Hq, d)`` in the compute dtype.  The reference for everything else."""
    qg = group_queries(q, k.shape[1])
    return ungroup(normalize(rc_state(qg, [TokenSet(k, v)], _scale(q, scale))))


def topk_attention(
    q: torch.Tensor,
    k_anchor: torch.Tensor,
    v_anchor: torch.Tensor,
    k_ret: torch.Tensor,
    v_ret: torch.Tensor,
    ret_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax over anchors + retrieved tokens only, renormalised.

    ``q: (B, Hq, d)``; anchors ``(B, Hkv, A, d)``; retrieved ``(B, Hkv, K, d)`` (one set per KV
    head, shared by its G query heads); ``ret_valid: (B, Hkv, K)`` -> ``(B, Hq, d)``.
    """
    qg = group_queries(q, k_anchor.shape[1])
    state = rc_state(qg, [TokenSet(k_anchor, v_anchor)], _scale(q, scale), TokenSet(k_ret, v_ret, ret_valid))
    return ungroup(normalize(state))


def rc_attention(
    q: torch.Tensor,
    k_anchor: torch.Tensor,
    v_anchor: torch.Tensor,
    k_ret: torch.Tensor,
    v_ret: torch.Tensor,
    feature_map: FeatureMap,
    summary: Summary,
    ret_valid: torch.Tensor | None = None,
    gamma: torch.Tensor | float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Retrieval-completion: exact over anchors + retrieved, plus the summary's estimate of the
    unretrieved mid tokens, added unnormalised, then one normalisation.

    Shapes as :func:`topk_attention`; ``summary`` was built over the whole mid-region with
    ``feature_map``'s key features.  -> ``(B, Hq, d)``.
    """
    qg = group_queries(q, k_anchor.shape[1])
    state = rc_state(qg, [TokenSet(k_anchor, v_anchor)], _scale(q, scale), TokenSet(k_ret, v_ret, ret_valid),
                     Completion(feature_map, summary, gamma))
    return ungroup(normalize(state))


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Replace -inf (an empty set's log-scale) by 0 so that differences never give NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))

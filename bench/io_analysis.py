"""Aggregation for ``bench-io``: rows, per-head and per-entropy-bin breakdowns, and the trade-off
(docs/ARCHITECTURE.md, section 2): the quality-matched retrieval ratio rho* and the break-even I/O bandwidth.

Conventions: quality is "lower is better" KL(reference || variant) in nats per position, pooled
over answer and held-out positions; bytes are per decoded token (one decode step, all layers and KV
heads); token-equivalents are tokens read per KV head and layer per decoded token, and the
``bytes`` accounting adds the summary's size T_phi for rc.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

# Normalised attention entropy H / log N of a head's dense attention (as bench/scripts/attention_error.py).
ENTROPY_BINS = (("low", 0.0, 0.5), ("mid", 0.5, 0.9), ("high", 0.9, 1.01))


def entropy_bin(h: float) -> str:
    return next((name for name, lo, hi in ENTROPY_BINS if lo <= h < hi), "high")


@dataclass
class _Mean:
    total: float = 0.0
    n: int = 0

    def add(self, x: float, w: int = 1) -> None:
        self.total += x
        self.n += w

    @property
    def value(self) -> float | None:
        return self.total / self.n if self.n else None


@dataclass
class _HeadStats:
    entropy: _Mean = field(default_factory=_Mean)
    rel_error: _Mean = field(default_factory=_Mean)
    residual_share: _Mean = field(default_factory=_Mean)  # true mass of the unread tokens / all mass
    mass_log_ratio: _Mean = field(default_factory=_Mean)  # log(estimated / true unread mass), rc
    mass_abs_log_ratio: _Mean = field(default_factory=_Mean)
    dropped: int = 0  # queries whose estimate the safety check dropped

    def add(self, entropy: float, err: float, share: float | None, ratio: float | None) -> None:
        self.entropy.add(entropy)
        self.rel_error.add(err)
        if share is not None:
            self.residual_share.add(share)
        if ratio is not None:
            if math.isfinite(ratio):
                self.mass_log_ratio.add(ratio)
                self.mass_abs_log_ratio.add(abs(ratio))
            else:
                self.dropped += 1

    def as_dict(self) -> dict[str, Any]:
        return {"queries": self.rel_error.n, "entropy": self.entropy.value, "rel_error": self.rel_error.value,
                "residual_share": self.residual_share.value, "mass_log_ratio": self.mass_log_ratio.value,
                "mass_abs_log_ratio": self.mass_abs_log_ratio.value, "estimate_dropped": self.dropped}


@dataclass
class AnswerCost:
    """One greedy answer on one tier: its score and what its decode steps read and took."""

    score: float
    steps: int
    logical: float  # bytes per decode step, all tiers read
    physical: float
    index: float  # selection bytes per decode step
    ms: float | None  # per decode step
    tokens_read: float  # per KV head and layer per decode step
    summary_tokens: float  # T_phi (0 without completion)
    mid_tokens: int
    matches_quality_tier: bool


class Accumulator:
    """Everything bench-io measures, keyed by variant key (``topk@0.01``), tier, task and length."""

    def __init__(self) -> None:
        self.heads: dict[tuple[str, int, int], _HeadStats] = defaultdict(_HeadStats)
        self.head_bins: dict[tuple[str, str], _HeadStats] = defaultdict(_HeadStats)
        self.quality: dict[tuple[str, str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.kl_bins: dict[tuple[str, str], _Mean] = defaultdict(_Mean)
        self.answers: dict[tuple[str, str, str, int], list[AnswerCost]] = defaultdict(list)
        self.accuracy_bins: dict[tuple[str, str], _Mean] = defaultdict(_Mean)
        self.timings: dict[tuple[str, str, int], list[float]] = defaultdict(list)  # (key, tier, length) -> ms per token
        self.recall: dict[str, _Mean] = defaultdict(_Mean)  # key -> recall@K of the exact Top-K, per sampled query

    def add_recall(self, key: str, recall: float) -> None:
        """The share of the exact Top-K a selector's choice holds, at one sampled query (all heads)."""
        self.recall[key].add(recall)

    def add_heads(self, key: str, layer: int, entropy: torch.Tensor, err: torch.Tensor,
                  share: torch.Tensor | None, ratio: torch.Tensor | None) -> None:
        """Per query head of one layer at one query: ``(Hkv, G)`` tensors."""
        g = entropy.shape[-1]
        for kv in range(entropy.shape[0]):
            for j in range(g):
                h = float(entropy[kv, j])
                args = (h, float(err[kv, j]), None if share is None else float(share[kv, j]), None if ratio is None else float(ratio[kv, j]))
                self.heads[key, layer, kv * g + j].add(*args)
                self.head_bins[key, entropy_bin(h)].add(*args)

    def add_quality(self, key: str, task: str, length: int, kl_answer: list[float], kl_heldout: list[float],
                    loglik_delta: float, answer_tokens: int, bins: list[str]) -> None:
        q = self.quality[key, task, length]
        q["kl_answer"] += kl_answer
        q["kl_heldout"] += kl_heldout
        q["loglik_delta"].append(loglik_delta)
        q["loglik_delta_per_token"].append(loglik_delta / max(answer_tokens, 1))
        for kl, b in zip(kl_answer + kl_heldout, bins, strict=True):
            self.kl_bins[key, b].add(kl)

    def add_answer(self, key: str, tier: str, task: str, length: int, cost: AnswerCost, example_bin: str, quality_tier: bool) -> None:
        self.answers[key, tier, task, length].append(cost)
        if quality_tier:
            self.accuracy_bins[key, example_bin].add(cost.score)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _cost_summary(costs: list[AnswerCost], bandwidths: tuple[tuple[str, float], ...], compute_ms: float | None,
                  timed_ms: float | None) -> dict[str, Any]:
    """Bytes per decoded token over ``costs``' decode steps; ``timed_ms``: this variant's timed ms
    per token on this tier; ``compute_ms``: on the quality tier (the compute in the modelled time)."""
    steps = sum(c.steps for c in costs)
    per_token = lambda attr: sum(getattr(c, attr) * c.steps for c in costs) / steps if steps else None  # noqa: E731
    tokens_read = per_token("tokens_read")
    t_phi = costs[0].summary_tokens if costs else 0.0
    mid = sum(c.mid_tokens for c in costs) / len(costs) if costs else 0
    physical = per_token("physical")
    out = {
        "examples": len(costs), "accuracy": _mean([c.score for c in costs]), "decode_steps": steps,
        "answers_match_quality_tier": all(c.matches_quality_tier for c in costs),
        "bytes_per_token": {"logical": per_token("logical"), "physical": physical},
        "index_bytes_per_token": per_token("index"),
        "token_equivalent": {"support": tokens_read, "bytes": None if tokens_read is None else tokens_read + t_phi},
        "effective_budget": {"support": None if tokens_read is None or not mid else tokens_read / mid,
                             "bytes": None if tokens_read is None or not mid else (tokens_read + t_phi) / mid},
        "summary_tokens": t_phi, "mid_tokens": mid,
        "ms_per_token": timed_ms,
        "answer_ms_per_token": sum((c.ms or 0.0) * c.steps for c in costs) / steps if steps else None,
        "modelled_ms_per_token": {},
    }
    if compute_ms is not None and physical is not None:
        out["modelled_ms_per_token"] = {name: compute_ms + 1e3 * physical / bw for name, bw in bandwidths}
    return out


def matched_budget(budgets: list[float], quality: list[float], target: float) -> tuple[float | None, str]:
    """The smallest budget at which ``quality`` (lower is better, one value per budget) reaches
    ``target``, interpolated linearly in log budget between grid points.  -> (budget, how):
    ``interpolated``, ``at most`` (already reached at the smallest budget of the grid), or
    (None, ``not reached``)."""
    pts = sorted(zip(budgets, quality, strict=True))
    if pts[0][1] <= target:
        return pts[0][0], "at most"
    for (b0, q0), (b1, q1) in zip(pts, pts[1:]):
        if q1 <= target:
            f = (q0 - target) / (q0 - q1)
            return math.exp(math.log(b0) + f * (math.log(b1) - math.log(b0))), "interpolated"
    return None, "not reached"


def interpolate(budgets: list[float], values: list[float], budget: float) -> float:
    """``values`` (one per budget) at ``budget``, linear in log budget; clamped to the grid."""
    pts = sorted(zip(budgets, values, strict=True))
    if budget <= pts[0][0]:
        return pts[0][1]
    for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
        if budget <= b1:
            f = (math.log(budget) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return v0 + f * (v1 - v0)
    return pts[-1][1]


def break_even(saved_bytes: float, overhead_ms: float) -> dict[str, Any]:
    """When does reading ``saved_bytes`` fewer per token at a cost of ``overhead_ms`` more compute
    pay off?  At I/O bandwidth W the saving is saved_bytes / W; -> the bandwidth where both are
    equal and on which side of it rc is faster."""
    if saved_bytes > 0 and overhead_ms > 0:
        return {"bandwidth": saved_bytes / (overhead_ms * 1e-3), "rc_faster": "below"}
    if saved_bytes > 0:
        return {"bandwidth": None, "rc_faster": "always"}
    if overhead_ms >= 0:
        return {"bandwidth": None, "rc_faster": "never"}
    return {"bandwidth": saved_bytes / (overhead_ms * 1e-3), "rc_faster": "above"}


def summarise(meta: dict[str, Any], variants: list, acc: Accumulator, bandwidths: tuple[tuple[str, float], ...],
              tiers: tuple[str, ...], quality_tier: str) -> dict[str, Any]:
    """The report: rows (variant x tier x task x length), overview (variant x tier x length, pooled
    over tasks), timings, per-head and per-entropy-bin breakdowns, and rc against topk per length."""
    by_key = {v.key: v for v in variants}
    ident = lambda v: {"variant": v.key, "method": v.method, "estimator": v.estimator, "budget": v.budget,  # noqa: E731
                       "selector": v.selector if v.method in ("topk", "rc") else None,
                       "recall_at_k": _recall(acc, v)}
    timed = {k: _median(xs) for k, xs in acc.timings.items()}
    timing = [{**ident(by_key[k]), "tier": t, "length": n, "ms_per_token": timed[k, t, n], "rounds": len(xs)}
              for (k, t, n), xs in sorted(acc.timings.items(), key=lambda kv: (kv[0][2], kv[0][1]))]
    rows = []
    for (key, tier, task, length), costs in sorted(acc.answers.items(), key=lambda kv: (kv[0][3], kv[0][2], kv[0][1])):
        rows.append({**ident(by_key[key]), "tier": tier, "task": task, "length": length, **_quality(acc.quality.get((key, task, length), {})),
                     **_cost_summary(costs, bandwidths, timed.get((key, quality_tier, length)), timed.get((key, tier, length)))})
    lengths = sorted({n for (_, _, _, n) in acc.answers})
    overview = []
    for length in lengths:
        for v in variants:
            pooled: dict[str, list[float]] = defaultdict(list)
            for (k, _, n), q in acc.quality.items():
                if k == v.key and n == length:
                    for name, xs in q.items():
                        pooled[name] += xs
            for tier in tiers:
                costs = [c for (k, t, _, n), cs in acc.answers.items() if (k, t, n) == (v.key, tier, length) for c in cs]
                overview.append({**ident(v), "tier": tier, "length": length, **_quality(pooled),
                                 **_cost_summary(costs, bandwidths, timed.get((v.key, quality_tier, length)), timed.get((v.key, tier, length)))})
    heads = [{**ident(by_key[k]), "layer": layer, "head": head, **s.as_dict()} for (k, layer, head), s in sorted(acc.heads.items())]
    bins = []
    for v in variants:
        for name, _, _ in ENTROPY_BINS:
            hs = acc.head_bins.get((v.key, name))
            kl = acc.kl_bins.get((v.key, name))
            accuracy = acc.accuracy_bins.get((v.key, name))
            bins.append({**ident(v), "bin": name, "head_queries": hs.as_dict() if hs else None,
                         "positions": kl.n if kl else 0, "kl": kl.value if kl else None,
                         "examples": accuracy.n if accuracy else 0, "accuracy": accuracy.value if accuracy else None})
    return {"meta": meta, "overview": overview, "rows": rows, "timing": timing, "heads": heads, "entropy_bins": bins,
            "tradeoff": [t for n in lengths for t in tradeoff([r for r in overview if r["length"] == n], variants, tiers,
                                                              quality_tier, bandwidths, n)]}


def _recall(acc: Accumulator, v) -> float | None:  # noqa: ANN001 (a Variant)
    """recall@K of the exact Top-K: 1 for exact selection, measured for the others, None without selection."""
    if v.method not in ("topk", "rc"):
        return None
    return 1.0 if v.selector == "exact" else acc.recall[v.key].value


def _quality(q: dict[str, list[float]]) -> dict[str, Any]:
    pooled = q.get("kl_answer", []) + q.get("kl_heldout", [])
    return {"kl": _mean(pooled), "kl_answer": _mean(q.get("kl_answer", [])), "kl_heldout": _mean(q.get("kl_heldout", [])),
            "loglik_delta": _mean(q.get("loglik_delta", [])), "loglik_delta_per_token": _mean(q.get("loglik_delta_per_token", []))}


def tradeoff(overview: list[dict], variants: list, tiers: tuple[str, ...], quality_tier: str,
             bandwidths: tuple[tuple[str, float], ...], length: int) -> list[dict[str, Any]]:
    """At one length, for each estimator and topk budget b: rho* = b' / b where rc at budget b'
    matches topk's KL at b, then per tier the bytes rc saves, the compute it adds (timed ms on
    the quality tier), the break-even bandwidth and the modelled times at the given bandwidths."""
    row = {(r["variant"], r["tier"]): r for r in overview}
    budgets = sorted({v.budget for v in variants if v.method == "topk"})
    out = []
    for est in sorted({v.estimator for v in variants if v.method == "rc"}):
        rc_budgets = sorted({v.budget for v in variants if v.method == "rc" and v.estimator == est})
        rc_keys = [f"rc-{est}@{b:g}" for b in rc_budgets]
        rc_kl = [row[k, quality_tier]["kl"] for k in rc_keys]
        for b in budgets:
            target = row[f"topk@{b:g}", quality_tier]["kl"]
            matched, how = matched_budget(rc_budgets, rc_kl, target)
            entry: dict[str, Any] = {"length": length, "estimator": est, "topk_budget": b, "topk_kl": target,
                                     "rc_budget": matched, "match": how, "rho_star": None if matched is None else matched / b,
                                     "tiers": {}}
            if matched is not None and _complete(row, rc_keys + [f"topk@{b:g}"], tiers, quality_tier):
                for tier in tiers:
                    t_row = row[f"topk@{b:g}", tier]
                    rc_bytes = interpolate(rc_budgets, [row[k, tier]["bytes_per_token"]["physical"] for k in rc_keys], matched)
                    rc_ms = interpolate(rc_budgets, [row[k, quality_tier]["ms_per_token"] for k in rc_keys], matched)
                    topk_ms = row[f"topk@{b:g}", quality_tier]["ms_per_token"]
                    topk_bytes = t_row["bytes_per_token"]["physical"]
                    saved, overhead = topk_bytes - rc_bytes, rc_ms - topk_ms
                    modelled = {name: {"topk_ms": topk_ms + 1e3 * topk_bytes / bw, "rc_ms": rc_ms + 1e3 * rc_bytes / bw}
                                for name, bw in bandwidths}
                    for m in modelled.values():
                        m["rc_faster"] = m["rc_ms"] < m["topk_ms"]
                    # Measured on this tier itself (its reads included): topk at b against rc at b'.
                    measured = {"topk_ms": row[f"topk@{b:g}", tier]["ms_per_token"],
                                "rc_ms": interpolate(rc_budgets, [row[k, tier]["ms_per_token"] for k in rc_keys], matched)}
                    measured["rc_faster"] = measured["rc_ms"] < measured["topk_ms"]
                    entry["tiers"][tier] = {"saved_bytes_per_token": saved, "compute_overhead_ms": overhead,
                                            "break_even": break_even(saved, overhead), "modelled": modelled, "measured": measured}
            out.append(entry)
    return out


def _complete(row: dict, keys: list[str], tiers: tuple[str, ...], quality_tier: str) -> bool:
    """Whether every timing and byte count the break-even needs was measured."""
    return all(row[k, t]["ms_per_token"] is not None and row[k, t]["bytes_per_token"]["physical"] is not None
               for k in keys for t in tiers)

"""Attention-output error of Top-K only, Top-K + random features and Top-K + centroids.

Synthetic heads (GQA: 2 KV heads x 4 query heads) whose queries span low to high attention entropy,
stored in bf16 as a model would; the dense reference is computed in float64 from those same bf16
keys and values.  For each budget (fraction of the mid-region) and both accountings of docs/ARCHITECTURE.md section 2
(`support`: summary not charged; `bytes`: rc retrieves K' = K - T_phi), it reports the mean relative
error ||o - o_dense|| / ||o_dense|| over query heads, split by the head's normalised attention
entropy (low < 0.5 <= mid < 0.9 <= high).

    python bench/scripts/attention_error.py                # full size: d 64 and 128, 8K-64K keys
    python bench/scripts/attention_error.py --quick        # small sizes, seconds

Prints one table and writes JSON (default bench/out/attention_error.json).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from rcengine.engine import EstimatorSpec, LayerContext, TokenCost, attention_entropy, retrieval_count

HKV, G = 2, 4
SINK, TAIL = 4, 64
# Query temperatures and pulls towards the planted needle direction: together they span
# normalised entropies from ~0.1 (a few needles hold the mass) to ~1.0 (uniform).
TEMPERATURES = (0.25, 0.5, 1.0, 2.0)
NEEDLE_PULL = (0.0, 0.7)
ENTROPY_BINS = (("low", 0.0, 0.5), ("mid", 0.5, 0.9), ("high", 0.9, 1.01))


def synthetic_head(n: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys ``(1, HKV, n, d)`` with a shared offset and anisotropic spread (as post-RoPE keys
    have), 32 planted needle keys per head along one direction; values with a common mean.
    Returns (k, v, needle_direction ``(HKV, d)``)."""
    spread = torch.exp(0.5 * torch.randn(d, generator=gen))
    k = torch.randn(HKV, 1, d, generator=gen) + torch.randn(HKV, n, d, generator=gen) * spread
    direction = torch.nn.functional.normalize(torch.randn(HKV, d, generator=gen), dim=-1)
    needles = torch.randint(0, n, (HKV, 32), generator=gen)
    k[torch.arange(HKV)[:, None], needles] += direction[:, None, :] * k.norm(dim=-1).mean()
    v = 0.5 * torch.randn(HKV, 1, d, generator=gen) + torch.randn(HKV, n, d, generator=gen)
    return k[None].to(torch.bfloat16), v[None].to(torch.bfloat16), direction


def queries(d: int, direction: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
    """One ``(1, HKV * G, d)`` query set per (temperature, needle pull)."""
    out = []
    for t in TEMPERATURES:
        for pull in NEEDLE_PULL:
            r = torch.nn.functional.normalize(torch.randn(HKV, G, d, generator=gen), dim=-1)
            q = torch.nn.functional.normalize(pull * direction[:, None] + (1 - pull) * r, dim=-1)
            out.append((q * t * math.sqrt(d)).reshape(1, HKV * G, d).to(torch.bfloat16))
    return out


def entropy_bin(h: float) -> str:
    return next(name for name, lo, hi in ENTROPY_BINS if lo <= h < hi)


def run(dims: list[int], sizes: list[int], budgets: list[float], seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    configs = [(d, n) for d in dims for n in sizes]
    with Progress(transient=True) as progress:
        task = progress.add_task("synthetic heads", total=len(configs))
        for d, n in configs:
            k, v, direction = synthetic_head(n, d, gen)
            estimators = {
                "topk": None,
                "rc-favor": EstimatorSpec("favor", num_features=d, seed=seed),
                "rc-centroid": EstimatorSpec("centroid", num_features=d // 2, seed=seed),
            }
            ctxs = {name: LayerContext.build(k, v, SINK, TAIL, spec or EstimatorSpec("none")) for name, spec in estimators.items()}
            mid = ctxs["topk"].mid_len
            for qi, q in enumerate(queries(d, direction, gen)):
                ref = ctxs["topk"].attend(q.double(), "dense")  # (1, Hq, d), float64
                ent = attention_entropy(q, k)[0]
                for name, ctx in ctxs.items():
                    summary_bytes = 0 if ctx.summary is None else ctx.summary.nbytes_per_head() + ctx.feature_map.state_bytes_per_head()
                    cost = TokenCost(head_dim=d, kv_bytes=2, summary_bytes=summary_bytes)
                    for budget in budgets:
                        for accounting in ("support", "bytes"):
                            count = retrieval_count(budget, mid) if name == "topk" else cost.retrieved(budget, mid, accounting)
                            out = ctx.attend(q, "topk" if name == "topk" else "rc", count).double()
                            err = ((out - ref).norm(dim=-1) / ref.norm(dim=-1))[0]
                            for h in range(HKV * G):
                                rows.append({
                                    "d": d, "n": n, "query_set": qi, "head": h, "method": name,
                                    "budget": budget, "accounting": accounting, "retrieved": count,
                                    "summary_tokens": cost.summary_tokens, "entropy": float(ent[h]),
                                    "rel_error": float(err[h]),
                                })
            progress.advance(task)
    return {"rows": rows}


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["accounting"], r["budget"])].append(r)
    table = []
    for (method, accounting, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        entry = {"method": method, "accounting": accounting, "budget": budget, "all": _mean(rs)}
        for name, _, _ in ENTROPY_BINS:
            entry[name] = _mean([r for r in rs if entropy_bin(r["entropy"]) == name])
        entry["count"] = {name: sum(entropy_bin(r["entropy"]) == name for r in rs) for name, _, _ in ENTROPY_BINS}
        table.append(entry)
    return table


def _mean(rs: list[dict]) -> float | None:
    return sum(r["rel_error"] for r in rs) / len(rs) if rs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--sizes", default="8192,16384,32768,65536")
    parser.add_argument("--budgets", default="0.005,0.01,0.02,0.04")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="d 64, 4K and 8K keys")
    parser.add_argument("--out", type=Path, default=Path("bench/out/attention_error.json"))
    args = parser.parse_args()
    dims = [64] if args.quick else [int(x) for x in args.dims.split(",")]
    sizes = [4096, 8192] if args.quick else [int(x) for x in args.sizes.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    result = run(dims, sizes, budgets, args.seed)
    table = aggregate(result["rows"])
    meta = {
        "date": date.today().isoformat(), "machine": f"{platform.node()} ({platform.machine()}, {torch.get_num_threads()} threads)",
        "dims": dims, "sizes": sizes, "budgets": budgets, "seed": args.seed, "kv_heads": HKV, "group": G,
        "sink": SINK, "tail": TAIL, "favor_features": "d", "centroids": "d/2", "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "table": table, "rows": result["rows"]}))

    console = Console()
    t = Table(title=f"relative output error vs dense (mean over heads; d {dims}, n {sizes})")
    for col in ("budget", "accounting", "method", "low H", "mid H", "high H", "all"):
        t.add_column(col, justify="right")
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    for e in table:
        if e["method"] == "topk" and e["accounting"] == "bytes":
            continue  # Top-K holds no summary: both accountings are the same
        t.add_row(f"{e['budget']:.3f}", e["accounting"] if e["method"] != "topk" else "-", e["method"],
                  fmt(e["low"]), fmt(e["mid"]), fmt(e["high"]), fmt(e["all"]))
    console.print(t)
    counts = table[0]["count"]
    console.print(f"heads per bin and cell: {counts}; wrote {args.out} in {meta['seconds']} s")


if __name__ == "__main__":
    main()

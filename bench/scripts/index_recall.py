"""Recall@K of IVF and HNSW key indexes against the flat (exact) index, with selection cost.

Keys as post-RoPE keys look (a shared offset, anisotropic spread, a few planted needles); queries
from another distribution (their own offset), as real queries and keys are.  Each KV head gets
its own index; a search takes the 4 queries of the head's group and returns one merged set.

    python bench/scripts/index_recall.py [--sizes 32768,131072] [--budget 0.01]

Recall is |found & exact| / K; time is relative to the flat search measured in the same run; key
vectors touched come from FAISS's own counters.  Prints one table, writes JSON
(default bench/out/index_recall.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import faiss
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from rcengine.storage import ByteMeter, IndexSpec, KeyIndex

HKV, G, D = 2, 4, 128

VARIANTS = [
    ("flat", IndexSpec("flat")),
    ("ivf nprobe 8", IndexSpec("ivf", nlist=256, nprobe=8)),
    ("ivf nprobe 32", IndexSpec("ivf", nlist=256, nprobe=32)),
    ("ivf nprobe 128", IndexSpec("ivf", nlist=256, nprobe=128)),
    ("hnsw ef 128", IndexSpec("hnsw", hnsw_m=32, ef_search=128)),
    ("hnsw ef 512", IndexSpec("hnsw", hnsw_m=32, ef_search=512)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32768,131072")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--queries", type=int, default=16, help="query groups per size")
    parser.add_argument("--out", type=Path, default=Path("bench/out/index_recall.json"))
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    with Progress(transient=True) as progress:
        for n in [int(s) for s in args.sizes.split(",")]:
            k = max(1, round(args.budget * n))
            spread = torch.exp(0.5 * torch.randn(D, generator=gen))
            keys = torch.randn(HKV, 1, D, generator=gen) * 2 + torch.randn(HKV, n, D, generator=gen) * spread
            needle = torch.nn.functional.normalize(torch.randn(HKV, D, generator=gen), dim=-1)
            keys[:, torch.randint(0, n, (64,), generator=gen)] += needle[:, None] * 8
            q_offset = torch.randn(HKV, 1, D, generator=gen)
            queries = [q_offset + torch.randn(HKV, G, D, generator=gen) + (i % 2) * 2 * needle[:, None] for i in range(args.queries)]
            indexes, build_s = {}, {}
            task = progress.add_task(f"building indexes, {n} keys", total=len(VARIANTS))
            for name, spec in VARIANTS:
                t0 = time.perf_counter()
                index = KeyIndex(spec, 1, HKV, D, ByteMeter())
                index.add(0, keys)
                index.search(0, queries[0], k)  # IVF trains on first search
                build_s[name] = time.perf_counter() - t0
                index.meter.reset()
                indexes[name] = index
                progress.advance(task)
            exact = [indexes["flat"].search(0, q, k)[0] for q in queries]
            for name, index in indexes.items():
                t0 = time.perf_counter()
                found = [index.search(0, q, k)[0] for q in queries]
                seconds = time.perf_counter() - t0
                recall = sum(len(set(f[h].tolist()) & set(e[h].tolist())) for f, e in zip(found, exact, strict=True) for h in range(HKV))
                cost = index.meter.index_totals()
                rows.append({
                    "n": n, "k": k, "index": name, "recall": recall / (k * HKV * len(queries)),
                    "ms_per_search": 1e3 * seconds / (len(queries) * HKV), "vectors_per_search": cost.vectors / cost.searches,
                    "build_s": build_s[name],
                })
            flat_ms = next(r["ms_per_search"] for r in rows if r["n"] == n and r["index"] == "flat")
            for r in rows:
                if r["n"] == n:
                    r["time_vs_flat"] = r["ms_per_search"] / flat_ms
    meta = {"date": date.today().isoformat(), "machine": f"{platform.node()} ({os.cpu_count()} cpus, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads)",
            "kv_heads": HKV, "group": G, "head_dim": D, "budget": args.budget}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = Table(title=f"key index recall@K vs flat, K = {args.budget:.0%} of n, {G} queries a group")
    for col in ("n", "index", "recall", "time vs flat", "ms / search", "keys touched", "build s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["n"]), r["index"], f"{r['recall']:.3f}", f"{r['time_vs_flat']:.2f}", f"{r['ms_per_search']:.2f}",
                      f"{r['vectors_per_search']:.0f}", f"{r['build_s']:.1f}")
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Disk-tier block size and file layout: time and read amplification of Top-K gathers, side by side.

One layer of a 32K-token context (8 KV heads, d 128, bf16) is written to a Zarr store once per
block size and layout (``heads``: a file per block and KV head, the format-1 layout; ``chunks``: a
file per 16 blocks holding every KV head, each block read as a byte range: format 2).  A decode-like sequence of queries (each a small drift from the last, so consecutive
Top-K sets overlap as they do in decoding) selects K = budget x n rows per KV head; every block
size serves the same gathers, interleaved step by step.  Three cache states:

- ``cold``: the OS page cache is dropped for the store's files before every gather (fadvise) and
  the block cache is off: every block comes from the device;
- ``os-cached``: block cache off, files in the page cache: the software cost per block;
- ``block-cache``: a 64 MiB block cache, kept across steps: what decoding sees.

    python -m rcengine.bench.scripts.disk_layout [--tokens 32768] [--budget 0.01] [--steps 16] [--blocks 16,64,256,1024]
                                          [--layouts heads,chunks] [--dir /tmp]

Prints one table and writes JSON (default bench/out/disk_layout.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ...storage import ByteMeter, DiskTier, TierLayout

HKV, D, G = 8, 128, 4


def drop_page_cache(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--blocks", default="16,64,256,1024")
    parser.add_argument("--layouts", default="heads,chunks")
    parser.add_argument("--dir", default=None, help="where to write the stores (a local disk)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/disk_layout.json"))
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    layouts = args.layouts.split(",")
    if unknown := set(layouts) - {"heads", "chunks"}:
        parser.error(f"unknown layout {sorted(unknown)[0]!r}: use heads and/or chunks")
    n, k = args.tokens, max(1, round(args.budget * args.tokens))
    gen = torch.Generator().manual_seed(0)
    keys = (torch.randn(HKV, 1, D, generator=gen) + torch.randn(HKV, n, D, generator=gen)).to(torch.bfloat16)
    values = torch.randn(HKV, n, D, generator=gen).to(torch.bfloat16)
    # Decode-like queries: each step drifts a little from the last.
    q = torch.randn(HKV, G, D, generator=gen)
    steps = []
    for _ in range(args.steps):
        q = 0.9 * q + 0.45 * torch.randn(HKV, G, D, generator=gen)
        scores = torch.einsum("hgd,hnd->hn", q, keys.float())
        steps.append(scores.topk(k, dim=-1).indices)

    work = Path(tempfile.mkdtemp(prefix="rc-disk-layout-", dir=args.dir))
    layout = TierLayout(1, HKV, D, torch.bfloat16)
    tiers: dict[tuple[int, str, str], DiskTier] = {}
    meters: dict[tuple[int, str, str], ByteMeter] = {}
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("writing stores", total=len(blocks) * len(layouts))
            for b in blocks:
                for lay in layouts:
                    where = work / f"b{b}-{lay}"
                    files = {"chunk_tokens": b, "chunk_heads": 1} if lay == "heads" else {}
                    tier = DiskTier.create(where, layout, block_tokens=b, **files)
                    for s in range(0, n, 4096):
                        tier.append(0, keys[:, s : s + 4096], values[:, s : s + 4096], torch.arange(s, min(n, s + 4096)))
                    tier.flush()
                    for mode in ("cold", "os-cached", "block-cache"):
                        meters[(b, lay, mode)] = ByteMeter()
                        cache = 64 << 20 if mode == "block-cache" else 0
                        tiers[(b, lay, mode)] = DiskTier.open(where, cache, meter=meters[(b, lay, mode)], checksums=tier.checksums)
                    progress.advance(task)
            seconds = {key: 0.0 for key in tiers}
            task = progress.add_task("gathering", total=len(steps))
            for ids in steps:
                for (b, lay, mode), tier in tiers.items():  # every variant serves the same step, in turn
                    if mode == "cold":
                        drop_page_cache(work / f"b{b}-{lay}")
                    t0 = time.perf_counter()
                    kk, _ = tier.gather(0, ids)
                    seconds[(b, lay, mode)] += time.perf_counter() - t0
                    assert torch.equal(kk[0].view(torch.int16), keys[0, ids[0]].view(torch.int16))
                progress.advance(task)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for (b, lay, mode), meter in meters.items():
        t = meter.totals(tier="disk")
        rows.append({
            "block_tokens": b, "layout": lay, "mode": mode, "ms_per_gather": 1e3 * seconds[(b, lay, mode)] / len(steps),
            "logical_bytes": t.logical, "physical_bytes": t.physical, "amplification": t.physical / t.logical,
            "disk_read_bytes": t.disk_read, "cache_hit_rate": t.cache_hits / max(1, t.cache_hits + t.cache_misses),
        })
    first = (blocks[0], layouts[0])
    base = {mode: next(r["ms_per_gather"] for r in rows if (r["block_tokens"], r["layout"]) == first and r["mode"] == mode)
            for mode in ("cold", "os-cached", "block-cache")}
    for r in rows:
        r["time_vs_first"] = r["ms_per_gather"] / base[r["mode"]]
    meta = {
        "date": date.today().isoformat(), "machine": f"{platform.node()} ({os.cpu_count()} cpus)",
        "tokens": n, "kv_heads": HKV, "head_dim": D, "k": k, "steps": len(steps), "dir": str(args.dir or tempfile.gettempdir()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    table = Table(title=f"disk tier: {n} tokens, {HKV} KV heads x d {D} bf16, K = {k} per head, {len(steps)} steps")
    for col in ("mode", "block", "layout", "ms / gather", f"vs {first[0]} {first[1]}", "amplification", "disk MB read", "hit rate"):
        table.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: (r["mode"], r["block_tokens"], r["layout"])):
        table.add_row(r["mode"], str(r["block_tokens"]), r["layout"], f"{r['ms_per_gather']:.2f}", f"{r['time_vs_first']:.2f}",
                      f"{r['amplification']:.1f}x", f"{r['disk_read_bytes'] / 1e6:.1f}", f"{r['cache_hit_rate']:.2f}")
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Host-tier gathers on a CUDA machine: zero-copy correctness and bandwidth.

Fills one layer of the host tier (pinned host memory) and gathers K random rows per KV head onto
the GPU three ways, side by side in one run:

- ``zero-copy``: the GPU reads the rows straight from pinned host memory (device view, UVA);
- ``cpu-select``: rows selected on the CPU (index_select), then copied to the GPU;
- ``device``: the same rows from device memory (the device tier), for reference;

plus the bulk pinned host-to-device copy bandwidth (the PCIe ceiling the gathers are held to).
Every gather is checked bit-for-bit against a CPU reference first.  Timings by CUDA events.

    python bench/scripts/gpu_storage.py [--rows 131072] [--heads 8] [--k 2048]

Prints one table and writes JSON (default bench/out/gpu_storage.json, or $OUT/gpu_storage.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import date
from pathlib import Path

import torch

from rcengine.storage import ByteMeter, TierLayout, device_tier, host_tier


def cuda_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=131072)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", default="256,2048,16384")
    parser.add_argument("--reps", type=int, default=50)
    out_dir = Path(os.environ.get("OUT", "bench/out"))
    parser.add_argument("--out", type=Path, default=out_dir / "gpu_storage.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_storage.py needs a CUDA device")
    dev = torch.device("cuda")
    lay = TierLayout(1, args.heads, args.dim, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(args.heads, args.rows, args.dim, generator=gen).to(torch.bfloat16)
    values = torch.randn(args.heads, args.rows, args.dim, generator=gen).to(torch.bfloat16)
    pos = torch.arange(args.rows)
    tiers = {
        "zero-copy": host_tier(lay, dev, ByteMeter(), initial_capacity=args.rows, zero_copy=True),
        "cpu-select": host_tier(lay, dev, ByteMeter(), initial_capacity=args.rows, zero_copy=False),
        "device": device_tier(lay, dev, ByteMeter()),
    }
    for tier in tiers.values():
        tier.append(0, keys, values, pos)
    rows = []
    for k in [int(x) for x in args.k.split(",")]:
        ids = torch.randint(0, args.rows, (args.heads, k), generator=gen)
        ids_dev = ids.to(dev)
        ref_k = torch.stack([keys[h, ids[h]] for h in range(args.heads)])
        ref_v = torch.stack([values[h, ids[h]] for h in range(args.heads)])
        nbytes = args.heads * k * lay.row_bytes
        for name, tier in tiers.items():
            got_k, got_v = tier.gather(0, ids_dev)
            exact = torch.equal(got_k.cpu().view(torch.int16), ref_k.view(torch.int16)) and torch.equal(
                got_v.cpu().view(torch.int16), ref_v.view(torch.int16)
            )
            ms = cuda_ms(lambda t=tier: t.gather(0, ids_dev), args.reps)
            rows.append({"variant": name, "k": k, "bytes": nbytes, "us": 1e3 * ms, "GB_s": nbytes / ms / 1e6, "exact": exact})
    bulk = torch.empty(512 << 20, dtype=torch.uint8).pin_memory()
    target = torch.empty_like(bulk, device=dev)
    ms = cuda_ms(lambda: target.copy_(bulk, non_blocking=True), 10)
    rows.append({"variant": "bulk pinned H2D copy", "k": None, "bytes": bulk.numel(), "us": 1e3 * ms, "GB_s": bulk.numel() / ms / 1e6, "exact": True})
    meta = {"date": date.today().isoformat(), "machine": f"{platform.node()} ({torch.cuda.get_device_name(0)}, torch {torch.__version__})",
            "rows": args.rows, "kv_heads": args.heads, "head_dim": args.dim, "row_bytes": lay.row_bytes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"{'variant':<22}{'K/head':>8}{'MB':>8}{'us':>10}{'GB/s':>8}  exact")
    for r in rows:
        print(f"{r['variant']:<22}{str(r['k'] or '-'):>8}{r['bytes'] / 1e6:>8.2f}{r['us']:>10.1f}{r['GB_s']:>8.1f}  {r['exact']}")
    print(f"wrote {args.out}")
    if not all(r["exact"] for r in rows):
        raise SystemExit("a gather was not bit-exact")


if __name__ == "__main__":
    main()

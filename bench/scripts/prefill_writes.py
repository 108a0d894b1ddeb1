"""Where a prefill to disk spends its time: the same prefill to host memory and to a scratch disk
store, and to disk with parts of the writing taken out, in turn, in one process.

Variants (each ``--repeats`` times, in turn, after a short warm-up prefill):

- ``host``: the host tier (no store);
- ``disk``: a scratch disk store, as ``rcengine generate --offload disk`` writes it (checksums
  computed on the GPU);
- ``disk-kernel-checksums``: the GPU's checksums by one Triton kernel per piece (storage/crc_kernel.py);
- ``disk-side-stream``: the GPU's checksums and copies on a stream of their own (storage/pending_rows.py),
  and ``disk-kernel-side-stream`` both;
- ``disk-host-checksums``: every checksum computed on the host, by the writer threads;
- ``disk-no-block-checksums``: no per-(head, block) checksums (chunk files checksummed on the host);
- ``disk-no-checksums``: without any checksum;
- ``disk-no-writes``: rows staged and checksummed, no file written;
- ``disk-staging-only``: rows copied to host memory, nothing else.

The ablations are diagnostics, made by patching the tier for the variant's duration: what a
variant saves over ``disk`` is what that part costs the prefill.  Rows record wall time, the
prefill's phases (``Document.prefill_phases_ms``) and the writers' time (``Document.prefill_writes``).
``--profile`` adds a torch.profiler table of one ``disk`` prefill (CPU and device ops).

    python -m rcengine.bench.scripts.prefill_writes [--length 32768] [--synthetic 8b] [--repeats 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import torch

from ...engine.config import EngineConfig
from ...engine.qa.engine import Engine
from ...storage import chunk_files, device_checksums, disk_tier, disk_writes, pending_rows
from ...storage.pending_rows import Segments


@contextlib.contextmanager
def _patched(changes: list[tuple[object, str, object]]) -> Iterator[None]:
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    for obj, name, value in changes:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


def _no_write(self, key, parts) -> None:  # noqa: ANN001
    self.ledger.checksums[key] = chunk_files.crc32c_parts_hex(parts)


def _staging_only(self, layer, first, pieces) -> None:  # noqa: ANN001
    Segments(pieces)  # waits for the copies


VARIANTS: dict[str, list[tuple[object, str, object]]] = {
    "disk": [],
    "disk-kernel-checksums": [(device_checksums, "KERNEL", True)],
    "disk-side-stream": [(pending_rows, "SIDE_STREAM", True)],
    "disk-kernel-side-stream": [(device_checksums, "KERNEL", True), (pending_rows, "SIDE_STREAM", True)],
    "disk-host-checksums": [(disk_writes, "DEVICE_CHECKSUMS", ())],
    "disk-no-block-checksums": [(disk_writes, "DEVICE_CHECKSUMS", ()), (disk_tier.DiskTier, "_record_block_checksums", lambda *a: None)],
    "disk-no-checksums": [(disk_writes, "DEVICE_CHECKSUMS", ()), (disk_tier.DiskTier, "_record_block_checksums", lambda *a: None),
                          (chunk_files, "crc32c_parts_hex", lambda parts: "00000000")],
    "disk-no-writes": [(chunk_files.ChunkFiles, "write", _no_write)],
    "disk-staging-only": [(disk_tier.DiskTier, "_write_chunks", _staging_only)],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--synthetic", choices=["8b"], default=None, help="the 8B-shaped random bf16 model (GPU) instead of the embedded one")
    parser.add_argument("--variants", default=",".join(["host", *VARIANTS]), help="comma-separated, from: host, " + ", ".join(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="a torch.profiler table of one disk prefill")
    parser.add_argument("--scratch", default=None, help="where the stores are written (default: the system's temporary folder)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n != "host" and n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from host, {', '.join(VARIANTS)}")
    if args.synthetic:
        from .synthetic import SHAPE_8B, random_llama

        lm = random_llama(SHAPE_8B, args.length + 4096, "cuda")
    else:
        from ...engine.hf.loader import load_model

        lm = load_model(None)
    device = torch.device(lm.device)
    ids = torch.randint(3, lm.model.config.vocab_size, (args.length,), generator=torch.Generator().manual_seed(args.length)).tolist()
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "prefill_writes.json"
    out = {"meta": {"date": date.today().isoformat(), "machine": platform.node(), "cpus": os.cpu_count(), "device": str(device),
                    "model": args.synthetic or "embedded", "tokens": args.length, "torch": torch.__version__}, "rows": []}
    work = Path(tempfile.mkdtemp(prefix="rcengine-prefill-writes-", dir=args.scratch))
    engines = {
        "host": Engine(lm, EngineConfig(method="rc", offload="cpu"), show_progress=False),
        "disk": Engine(lm, EngineConfig(method="rc", offload="disk", selector="block", scratch_dir=str(work)), show_progress=False),
    }

    def prefill(name: str) -> dict:
        engine = engines["host" if name == "host" else "disk"]
        with _patched(VARIANTS.get(name, [])):
            _sync(device)
            t0 = time.perf_counter()
            doc = engine.prefill(ids)
            _sync(device)
            seconds = time.perf_counter() - t0
            row = {"variant": name, "seconds": seconds, "phases_ms": doc.prefill_phases_ms, "writes": doc.prefill_writes}
            doc.close()
        return row

    try:
        for name in names:  # warm-up: every kernel's set-up, and pinned memory, before anything is timed
            engines["host" if name == "host" else "disk"].prefill(ids[: 4 * engines["host"].config.prefill_chunk]).close()
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.repeats):
            for name in names:
                row = prefill(name)
                times[name].append(row["seconds"])
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
        host = statistics.median(times["host"]) if "host" in times else None
        out["summary"] = {n: {"median_seconds": statistics.median(t), "vs_host": statistics.median(t) / host if host else None}
                          for n, t in times.items()}
        print(json.dumps(out["summary"]), flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                prefill("disk")
            (outdir / "prefill_writes_profile.txt").write_text(
                prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, path)


if __name__ == "__main__":
    main()

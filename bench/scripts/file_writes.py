"""What writing a store costs by file size: 1 GiB written as files of 32 KB (one 64-token block of
one KV head at d 128, bf16: the disk tier's version-1 layout), 256 KB and 2 MB (16 blocks of 8 KV
heads: version 2), by 8 threads, fsync included, side by side in one run.

    python -m rcengine.bench.scripts.file_writes [--dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

SIZES = (32 << 10, 256 << 10, 2 << 20)
TOTAL = 1 << 30
THREADS = 8


def write_files(root: Path, size: int, total: int, threads: int) -> float:
    """Seconds to write ``total`` bytes as files of ``size`` bytes (64 folders), then sync."""
    data = os.urandom(size)
    dirs = [root / f"d{i}" for i in range(64)]
    for d in dirs:
        d.mkdir(parents=True)

    def write(i: int) -> None:
        with open(dirs[i % 64] / str(i), "wb") as f:
            f.write(data)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(total // size)))
    os.sync()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where the files are written (default: the system's temporary folder)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args()
    rows = []
    for size in SIZES:
        work = Path(tempfile.mkdtemp(prefix="rcengine-writes-", dir=args.dir))
        try:
            seconds = write_files(work, size, TOTAL, THREADS)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append({"file_bytes": size, "files": TOTAL // size, "seconds_per_gib": seconds})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": {"date": date.today().isoformat(), "machine": platform.node(), "cpus": os.cpu_count(), "threads": THREADS,
                       "dir": args.dir or tempfile.gettempdir()}, "rows": rows}
    (out / "file_writes.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

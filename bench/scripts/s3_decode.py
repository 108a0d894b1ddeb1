"""A persisted document answered from an S3-compatible object store, beside the local disk tier,
in one run: per decode step the GETs, bytes fetched over the network and ms, with the block cache
cold (the store just opened) and warm (the same question again); what reopening reads; and the two
clients zarr can read S3 through (fsspec's s3fs, obstore) on the same ranged GETs.

The embedded model, a document of random token ids (``--tokens``, default 32,000), ``rc`` at
``--budget`` with the block selector (whole store blocks: what is read is what is attended), greedy,
``--new-tokens`` steps (EOS ignored).  The server is moto's server mode on the loopback address
behind a counting proxy (``s3_server.py``), unless ``AWS_ENDPOINT_URL`` names another (the proxy then
sits in front of that one).  Loopback to a Python server: the times are this machine's, not a
network's; the bytes and request counts are what any server would see.

    python -m rcengine.bench.scripts.s3_decode [--tokens 32000] [--out bench/out]

Results: ``DIR/s3_decode.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

from ...engine.config import EngineConfig
from ...engine.qa.engine import Engine
from ...engine.sampling import SamplingConfig
from ...storage.object_store import filesystem
from .s3_server import FaultProxy, start_moto

QUESTION_TOKENS = 16


def _answer_row(stats: dict, seconds: float, new_tokens: int, proxy: FaultProxy | None, before: tuple[int, int]) -> dict:
    disk = stats["bytes"]["by_tier"].get("disk", {})
    step = stats["bytes_per_decode_step"]["by_tier"].get("disk", {})
    row = {
        "answer_s": round(seconds, 3), "decode_ms_per_token": round(stats["timings_ms"]["decode_per_token"], 2),
        "question_ms": round(stats["timings_ms"]["question"], 1),
        "answer": {k: disk.get(k, 0) for k in ("logical", "physical", "network", "network_gets", "block_cache_hits",
                                               "block_cache_misses", "storage_device_read")},
        "per_decode_step": {k: round(v, 1) for k, v in step.items()},
        "physical_over_logical": round(disk.get("physical", 0) / disk["logical"], 3) if disk.get("logical") else None,
        "new_tokens": new_tokens,
    }
    if proxy is not None:  # what the server saw, as a check on the meter
        row["server"] = {"gets": proxy.gets - before[0], "bytes": proxy.bytes_out - before[1]}
    return row


def _backends(url: str, keys: list[tuple[str, int]], size: int, repeats: int) -> dict:
    """The same ranged GETs (``keys``: (key under kv.zarr, offset), ``size`` bytes each), all at once,
    through zarr's FsspecStore (s3fs) and ObjectStore (obstore): ms per batch, alternating."""
    import zarr.storage
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    stores = {"fsspec (s3fs)": zarr.storage.FsspecStore(filesystem(asynchronous=True), read_only=True, path=f"{bucket}/{prefix}")}
    try:
        from obstore.store import S3Store

        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        s3 = S3Store(bucket, prefix=prefix, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                     **({"endpoint": endpoint, "client_options": {"allow_http": True}} if endpoint else {}))
        stores["obstore"] = zarr.storage.ObjectStore(s3, read_only=True)
    except ImportError:
        pass
    proto = default_buffer_prototype()

    async def batch(store) -> int:  # noqa: ANN001
        bufs = await asyncio.gather(*(store.get(k, proto, RangeByteRequest(off, off + size)) for k, off in keys))
        return sum(len(b.to_bytes()) for b in bufs)

    times: dict[str, list[float]] = {name: [] for name in stores}
    for _ in range(repeats):
        for name, store in stores.items():
            t0 = time.perf_counter()
            got = sync(batch(store))
            times[name].append(1e3 * (time.perf_counter() - t0))
            assert got == size * len(keys), (name, got)
    return {name: {"ms_median": round(statistics.median(t), 1), "ms": [round(x, 1) for x in t],
                   "MB_per_s": round(size * len(keys) / 1e3 / statistics.median(t), 1)} for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32000, help="document tokens")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gets", type=int, default=512, help="ranged GETs per batch in the client comparison")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = None
    upstream = os.environ.get("AWS_ENDPOINT_URL")
    if upstream is None:
        server, upstream = start_moto()
        for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ.setdefault(k, v)
    proxy = FaultProxy(upstream)
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    bucket = f"rcengine-bench-{uuid.uuid4().hex[:8]}"
    filesystem().mkdir(bucket)
    url = f"s3://{bucket}/doc.rcs"

    cfg = EngineConfig(method="rc", budget=args.budget, offload="disk", selector="block")
    engine = Engine.load(None, cfg, device="cpu", show_progress=False)
    rng = random.Random(args.seed)
    vocab = engine.vocab_size
    doc_ids = [rng.randrange(3, vocab) for _ in range(args.tokens)]
    question = [rng.randrange(3, vocab) for _ in range(QUESTION_TOKENS)]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    report: dict = {"date": date.today().isoformat(), "machine": f"{platform.node()} ({os.cpu_count()} cores)",
                    "tokens": args.tokens, "budget": args.budget, "selector": "block", "new_tokens": args.new_tokens,
                    "server": "moto server on loopback" if server is not None else upstream, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"local disk": Path(tmp) / "doc.rcs", "s3": url}
        for name, store in stores.items():
            t0 = time.perf_counter()
            engine.prefill(doc_ids, store=store).close()
            prefill_s = time.perf_counter() - t0
            before = (proxy.gets, proxy.bytes_out)
            t0 = time.perf_counter()
            doc = engine.open(store)
            open_s = time.perf_counter() - t0
            opened = {"gets": proxy.gets - before[0], "bytes": proxy.bytes_out - before[1]}
            rows = {"prefill_s": round(prefill_s, 2), "open_s": round(open_s, 3)}
            if name == "s3":
                rows["open_server"] = opened
            for phase in ("cold", "warm"):
                before = (proxy.gets, proxy.bytes_out)
                t0 = time.perf_counter()
                answer = doc.ask(question, sampling)
                rows[phase] = _answer_row(answer.stats, time.perf_counter() - t0, answer.new_tokens,
                                          proxy if name == "s3" else None, before)
            doc.close()
            if name == "s3":
                step_logical = rows["cold"]["per_decode_step"]["logical"]
                rows["open_over_step_logical"] = round(opened["bytes"] / step_logical, 2) if step_logical else None
            report["rows"][name] = rows
            (args.out / "s3_decode.json").write_text(json.dumps(report, indent=2))
        # The two clients on the same ranged GETs: blocks of the store's chunk files, chosen at random.
        fs = filesystem()
        gen = next(p for p in fs.ls(f"{bucket}/doc.rcs") if "/gen-" in p)
        root = f"{gen}/kv.zarr"
        chunks = sorted(p for p in fs.find(root) if p.removeprefix(root + "/").startswith("L") and "/c." in p)  # KV, not positions
        sizes = fs.sizes(chunks)
        block = 64 * 2 * 64 * 2  # block_tokens x (k, v) x head dim x bf16 bytes
        places = [(c.removeprefix(gen + "/"), off) for c, n in zip(chunks, sizes, strict=True) for off in range(0, n - block + 1, block)]
        keys = random.Random(args.seed).sample(places, min(args.gets, len(places)))
        report["clients"] = {"gets_per_batch": len(keys), "bytes_per_get": block,
                             **_backends(f"s3://{gen}", keys, block, args.repeats)}
    (args.out / "s3_decode.json").write_text(json.dumps(report, indent=2))
    for name, rows in report["rows"].items():
        for phase in ("cold", "warm"):
            r = rows[phase]
            s = r["per_decode_step"]
            print(f"{name:10s} {phase}: {r['decode_ms_per_token']:7.2f} ms/token, per step {s.get('network_gets', 0):6.1f} GETs, "
                  f"{s.get('network', 0) / 1e3:8.1f} KB network, {s['logical'] / 1e3:8.1f} KB logical; answer physical/logical "
                  f"{r['physical_over_logical']}")
    print(f"s3 open: {report['rows']['s3']['open_server']} = {report['rows']['s3']['open_over_step_logical']}x one step's logical KV")
    for name, r in report["clients"].items():
        if isinstance(r, dict):
            print(f"client {name}: {r['ms_median']} ms per {len(keys)} GETs ({r['MB_per_s']} MB/s)")
    proxy.stop()
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()

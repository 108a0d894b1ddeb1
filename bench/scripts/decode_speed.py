"""Decode speed and memory: stock transformers vs rcengine's dense-offloaded and rc, side by side.

For each context length, one prompt of random tokens is prefilled twice: by stock transformers
(DynamicCache, SDPA) and by rcengine (persisted to a store).  The store is then reopened once per
variant, on the cpu tier (host memory) and the disk tier (Zarr + block cache), with methods
``dense`` (reads every mid token every step) and ``rc`` at budgets 1 % and 2 % (exact selection
over keys held in memory; on disk also block selection, and FAISS over keys streamed from the
store).  All variants decode in interleaved rounds, so machine noise hits them alike; the table
gives ms per token and its ratio to stock decoding measured in the same run, bytes read per token,
and KV bytes resident.

Then, in a fresh process, the longest document is reopened on the disk tier with a small block
cache and the block selector, and decoded: its peak resident memory growth over the loaded model is
compared with the block-cache bound plus the in-memory parts (anchors, summaries, block bounds).

    python bench/scripts/decode_speed.py [--lengths 4096,16384,32768] [--model DIR] [--quick]

Writes JSON (default bench/out/decode_speed.json, or $OUT/decode_speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import date
from pathlib import Path

import torch

from rcengine import Engine, EngineConfig, SamplingConfig
from rcengine.bench.scripts.synthetic import save_random_llama
from rcengine.engine.hf.integration import model_call, stock_prefill
from rcengine.engine.progress import progress
from rcengine.storage.document_store import KEY_BLOCK_ROWS

# (tier, method, budget, selector): exact selection holds every mid key in memory; a document
# reopened on the disk tier with the faiss selector streams its keys from the store at each search
# instead, and the block selector holds per-block key bounds (a sixteenth of the KV at 16 tokens).
VARIANTS = [(tier, method, budget, "exact") for tier in ("cpu", "disk") for method, budget in (("dense", 1.0), ("rc", 0.01), ("rc", 0.02))]
VARIANTS += [("disk", "rc", 0.02, "block"), ("disk", "rc", 0.02, "faiss")]


def bench_model(root: Path) -> Path:
    """A random Llama of a small real shape (4 layers, 4 q / 2 KV heads of dim 64) for timing."""
    return save_random_llama(root / "bench-llama")


def stock_decoder(model, ids: list[int], chunk: int):  # noqa: ANN001, ANN201
    """Prefill with stock transformers; return a function that decodes one token and its cache."""
    dev = next(model.parameters()).device
    model.set_attn_implementation("sdpa")
    cache, logits = stock_prefill(model, ids, chunk)
    state = {"token": int(logits[0].argmax()), "pos": len(ids)}

    def step() -> None:
        with torch.no_grad():
            out = model_call(model, torch.tensor([[state["token"]]], device=dev), cache,
                             position_ids=torch.tensor([[state["pos"]]], device=dev))
        state["token"] = int(out.logits[0, -1].argmax())
        state["pos"] += 1

    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return step, kv_bytes


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,16384,32768")
    parser.add_argument("--model", type=Path, default=None, help="a local model folder (default: a random bench-shaped Llama)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens-per-round", type=int, default=4)
    parser.add_argument("--cache-mb", type=int, default=8, help="block-cache bound for the memory check")
    parser.add_argument("--quick", action="store_true", help="lengths 2048 and 4096, 3 rounds")
    out_dir = Path(os.environ.get("OUT", "bench/out"))
    parser.add_argument("--out", type=Path, default=out_dir / "decode_speed.json")
    args = parser.parse_args()
    lengths = [2048, 4096] if args.quick else [int(x) for x in args.lengths.split(",")]
    rounds = 3 if args.quick else args.rounds
    work = Path(tempfile.mkdtemp(prefix="rc-decode-speed-"))
    try:  # the stores (hundreds of MB at 32K) go with the run
        model_path = args.model or bench_model(work)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        base = Engine.load(model_path, EngineConfig(offload="cpu"), show_progress=True)
        vocab = base.lm.model.config.vocab_size
        rows, memory = [], None
        for n in lengths:
            ids = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            t0 = time.perf_counter()
            stock_step, stock_kv = stock_decoder(base.lm.model, ids, 1024)
            stock_prefill_s = time.perf_counter() - t0
            base.lm.model.set_attn_implementation("rcengine")
            store = work / f"doc-{n}"
            t0 = time.perf_counter()
            base.prefill(ids, store=store).close()
            rc_prefill_s = time.perf_counter() - t0
            docs = {}
            for tier, method, budget, selector in VARIANTS:
                eng = Engine(base.lm, EngineConfig(method=method, budget=budget, selector=selector), show_progress=False)
                docs[(tier, method, budget, selector)] = eng.open(store, offload=tier)
            seconds = {key: [] for key in [("stock", "-", 0.0, "-"), *docs]}
            bytes_per_token = {key: [] for key in docs}
            question = [ids[-1]]
            sampling = SamplingConfig(max_new_tokens=args.tokens_per_round + 1)
            with progress(f"decoding at {n} tokens", rounds, "rounds") as advance:
                for _ in range(rounds):
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(args.tokens_per_round):
                        stock_step()
                    sync()
                    seconds[("stock", "-", 0.0, "-")].append((time.perf_counter() - t0) / args.tokens_per_round)
                    for key, doc in docs.items():
                        answer = doc.ask(question, sampling)
                        steps = answer.stats["decode_steps"]
                        seconds[key].append(answer.stats["timings_ms"]["decode_per_token"] / 1e3)
                        bytes_per_token[key].append(answer.stats["bytes"]["logical"] / answer.stats["queries"])
                        assert steps == args.tokens_per_round
                    advance(1)
            stock_ms = 1e3 * statistics.median(seconds[("stock", "-", 0.0, "-")])
            for key, values in seconds.items():
                tier, method, budget, selector = key
                ms = 1e3 * statistics.median(values)
                doc = docs.get(key)
                name = "stock transformers" if tier == "stock" else f"{method} {budget:g}" + (f" {selector}" if method == "rc" else "")
                row = {"tokens": n, "variant": name, "tier": tier,
                       "ms_per_token": ms, "vs_stock": ms / stock_ms,
                       "bytes_per_token": statistics.median(bytes_per_token[key]) if key in bytes_per_token else None,
                       "kv_bytes_resident": stock_kv if doc is None else _resident(doc)}
                if tier == "stock":
                    row["prefill_s"] = stock_prefill_s
                elif method == "dense":
                    row["prefill_s"] = rc_prefill_s
                rows.append(row)
            for doc in docs.values():
                doc.close()
        memory = _memory_check(model_path, work / f"doc-{lengths[0]}", work / f"doc-{lengths[-1]}", args.cache_mb << 20)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"date": date.today().isoformat(),
            "machine": f"{platform.node()} ({os.cpu_count()} cpus, {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__})",
            "model": str(args.model or "random bench Llama: 4 layers, hidden 256, 4 q / 2 KV heads, d 64"), "variants": [list(v) for v in VARIANTS],
            "dtype": str(base.lm.dtype), "device": str(base.lm.device), "rounds": rounds, "tokens_per_round": args.tokens_per_round}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "memory": memory}, indent=1))
    print(f"{'tokens':>7} {'variant':<34}{'tier':<6}{'ms/token':>10}{'vs stock':>10}{'KB read/token':>15}{'KV MB resident':>16}")
    for r in rows:
        read = "-" if r["bytes_per_token"] is None else f"{r['bytes_per_token'] / 1e3:.1f}"
        print(f"{r['tokens']:>7} {r['variant']:<34}{r['tier']:<6}{r['ms_per_token']:>10.2f}{r['vs_stock']:>10.2f}{read:>15}"
              f"{r['kv_bytes_resident'] / 1e6:>16.2f}")
    print("memory check:", json.dumps(memory))
    print(f"wrote {args.out}")


def _resident(doc) -> int:  # noqa: ANN001
    """KV bytes the document holds in memory: anchors, tail, selection state and summaries, and the
    tier's rows (cpu) or the most its block cache held (disk)."""
    total = sum(doc.state.device_bytes().values())
    tier = doc.state.tier
    if hasattr(tier, "cache"):
        total += tier.cache.peak_bytes
    else:
        total += sum(tier.rows(layer).numel() * tier.rows(layer).element_size() for layer in range(doc.state.num_layers))
    return total


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from transformers.utils import logging
    logging.disable_progress_bar()
    from rcengine import Engine, EngineConfig, SamplingConfig
    def rss():
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
    import gc
    cfg = EngineConfig(method="rc", budget=0.02, cache_bytes=int(sys.argv[4]), selector="block")
    engine = Engine.load(sys.argv[1], cfg, show_progress=False)
    warm = engine.open(sys.argv[2])  # a short document first: every code path once (BLAS buffers, threads)
    warm.ask([5], SamplingConfig(max_new_tokens=4))
    warm.close()
    del warm
    gc.collect()
    before = rss()
    doc = engine.open(sys.argv[3])
    opened = rss()
    answer = doc.ask([5], SamplingConfig(max_new_tokens=16))
    after = rss()
    st = doc.state
    mid = sum(st.tier.num_rows(l) for l in range(st.num_layers))
    print(json.dumps({"before": before, "opened": opened, "after": after, "cache_bound": int(sys.argv[4]),
                      "cache_peak": st.tier.cache.peak_bytes, "document_state_bytes": sum(st.device_bytes().values()),
                      "mid_kv_bytes": mid * st.num_kv_heads * st.tier.layout.row_bytes,
                      "mid_keys_fp32_bytes": mid * st.num_kv_heads * st.head_dim * 4, "head_dim": st.head_dim,
                      "disk_physical": answer.stats["bytes"]["physical"]}))
    """
)


def _memory_check(model: Path, warm_store: Path, store: Path, cache_bytes: int) -> dict:
    """Peak resident memory growth of reopening ``store`` on the disk tier and decoding 16 tokens,
    in a fresh process, after a short document has warmed every code path."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(model), str(warm_store), str(store), str(cache_bytes)],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    growth = m["after"]["VmHWM"] - m["before"]["VmRSS"]  # VmHWM: the peak, ever
    m["peak_growth_bytes"] = growth
    # What reopening may hold beyond the model: the block cache (bounded) and the document's state
    # (anchors, tail, block bounds, summaries), plus the blocks of float32 keys being turned into
    # block bounds at open: one verified block per KV head (read, copied, stacked) and the padded
    # max and min of it.
    m["bound_bytes"] = m["cache_bound"] + m["document_state_bytes"] + 6 * _heads(model) * KEY_BLOCK_ROWS * m["head_dim"] * 4
    m["within_bound"] = growth <= m["bound_bytes"]
    return m


def _heads(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())
    return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]


if __name__ == "__main__":
    main()

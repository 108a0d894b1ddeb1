"""The disk tier against the host tier, side by side in one run: prefill time, bytes per step by
tier (logical and physical) with a cold and a warm block cache, ms per token, and what reopening a
persisted document reads for its selection state.

For each length: one prefill into host memory (``offload cpu``) and one into a persisted store
(``offload disk``), timed.  Then ``rc`` at ``--budget`` decodes ``--tokens`` steps (greedy, EOS
ignored) with each of:

- ``host exact`` and ``host block B``: the host tier with exact Top-K, and with the disk's block
  selection (same units as on disk, so that only the tier differs);
- ``disk block B cold`` / ``warm``: the disk tier's default selection (whole store blocks), with the
  block cache emptied before the answer, and again with it as the previous answer left it (the
  cache holds one answer's blocks: ``--cache-mb``);
- ``disk exact-block B cold`` / ``warm``: whole store blocks ranked by their best exact key score;
- ``disk exact cold`` / ``warm``: token-level Top-K on the disk tier (each row pulls in its block;
  up to ``--exact-max`` tokens);
- ``reopened block B``, ``reopened exact-block B`` and ``reopened exact``: the store reopened (``Engine.open``) in a fresh
  engine: bytes read at open for selection (saved state and KV rows read to rebuild it) against
  the logical KV bytes of one decode step, then a repeated answer with the default block cache.

Rows record the steps run again after reading missed blocks (``reruns``); ``--profile`` writes a
torch.profiler table of a warm answer on each tier.

    python -m rcengine.bench.scripts.disk_decode [--lengths 16384] [--synthetic 8b] [--out DIR]

Without ``--synthetic`` it runs the embedded model on random token ids; ``--synthetic 8b`` builds
the 8B-shaped random bf16 model of ``bench/scripts/gpu_decode.py`` (GPU machine).  Results go to
``DIR/disk_decode.json`` after every row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from ...engine.config import EngineConfig
from ...engine.qa.document import Document
from ...engine.qa.engine import Engine
from ...engine.sampling import SamplingConfig
from ...storage import DEFAULT_BLOCK_TOKENS, DEFAULT_CACHE_BYTES, Artifact, DiskTier

QUESTION_TOKENS = 16


def _sync(lm) -> None:  # noqa: ANN001
    if torch.device(lm.device).type == "cuda":
        torch.cuda.synchronize()


def answer_row(doc: Document, question: list[int], tokens: int, cold: bool, profile: Path | None = None) -> dict:
    """One answer of ``tokens`` decode steps; per-step figures are means over its decode steps.
    ``profile``: write a torch.profiler table of the answer there (the ops by device time and by
    host time)."""
    if cold:
        doc.drop_caches()
    first = doc.meter.step + 1  # the answer's first step (the question's prefill)
    captures, reruns = doc.runner.captures, doc.runner.reruns
    sampling = SamplingConfig(max_new_tokens=tokens + 1, ignore_eos=True)
    if profile is None:
        answer = doc.ask(question, sampling)
    else:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profiler(activities=activities) as prof:
            answer = doc.ask(question, sampling)
        _sync(doc.engine.lm)
        table = prof.key_averages()
        by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        profile.write_text(f"{tokens}-token answer, by device time\n{table.table(sort_by=by, row_limit=25)}\n\n"
                           f"by host time\n{table.table(sort_by='self_cpu_time_total', row_limit=25)}\n")
    st = answer.stats
    per_step = st["bytes_per_decode_step"]["by_tier"]
    disk = doc.meter.totals(tier="disk", since=first)
    return {"ms_per_token": st["timings_ms"]["decode_per_token"],
            "kv_logical_per_step": {t: v["logical"] for t, v in per_step.items()},
            "kv_physical_per_step": {t: v["physical"] for t, v in per_step.items()},
            "selection_bytes_per_step": st["bytes_per_decode_step"]["index"],
            # the whole answer (question prefill and decode steps) on the disk tier
            "answer_disk_logical": disk.logical, "answer_disk_physical": disk.physical,
            "answer_disk_physical_over_logical": disk.physical / disk.logical if disk.logical else None,
            "answer_block_cache_hits": disk.cache_hits, "answer_block_cache_misses": disk.cache_misses,
            # steps run again after reading blocks they missed, and CUDA graphs captured, in the answer
            "reruns": doc.runner.reruns - reruns, "graphs_captured": doc.runner.captures - captures}


def timed_prefill(engine: Engine, ids: list[int], store: Path | None) -> tuple[Document, float]:
    _sync(engine.lm)
    t0 = time.perf_counter()
    doc = engine.prefill(ids, store=store)
    _sync(engine.lm)
    return doc, time.perf_counter() - t0


def _profile_prefill(engine: Engine, ids: list[int], path: Path, scratch: str | None) -> None:
    """A persisted prefill to disk under cProfile -> ``path``: functions by cumulative time (this
    package's) and by own time (all)."""
    import cProfile
    import io
    import pstats

    work = Path(tempfile.mkdtemp(prefix="rcengine-disk-bench-", dir=scratch))
    prof = cProfile.Profile()
    try:
        prof.enable()
        doc, seconds = timed_prefill(engine, ids, work / "doc")
        prof.disable()
        doc.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    text.write(f"prefill to disk of {len(ids)} tokens under cProfile: {seconds:.2f} s\n")
    package = re.escape(str(Path(__file__).parents[2])) + "/(engine|storage|bench)/"  # as imported
    stats.sort_stats("cumulative").print_stats(package, 45)
    stats.sort_stats("tottime").print_stats(30)
    path.write_text(text.getvalue())


def run_length(lm, n: int, args, out: dict, save) -> None:  # noqa: ANN001
    vocab = lm.model.config.vocab_size
    ids = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    question = ids[-QUESTION_TOKENS:]
    b = args.block
    base = EngineConfig(method="rc", budget=args.budget, block_tokens=b)
    # The fresh store's block cache holds one answer's blocks (its decode steps', and one layer of its
    # question's), so that a repeated answer is warm: a random model's steps select unrelated blocks,
    # so a smaller cache holds none of them by the time the answer repeats.  Reopened stores use the
    # default cache, for comparison.
    layers, heads, dim = lm.kv_shape
    block_bytes = b * 2 * dim * (torch.finfo(lm.dtype).bits // 8)
    units = math.ceil(math.ceil(args.budget * n) / b)
    answer_bytes = (layers * (args.tokens + 2) + QUESTION_TOKENS) * heads * units * block_bytes
    cache_bytes = (args.cache_mb << 20) if args.cache_mb is not None else max(DEFAULT_CACHE_BYTES, int(1.1 * answer_bytes))
    rows = out["rows"]

    def add(row: dict) -> None:
        rows.append({"tokens": n, **row})
        print(json.dumps(rows[-1]), flush=True)
        save()

    host_engine = Engine(lm, EngineConfig(**{**_fields(base), "offload": "cpu", "selector": "exact"}), show_progress=False)
    # A short prefill first, so that neither timed prefill pays for the first kernels' set-up (the
    # host prefill, timed first, used to: it made a disk prefill look 1.1-1.6x a host one, not 3.9x).
    timed_prefill(host_engine, ids[: 2 * base.prefill_chunk], None)[0].close()
    if args.prefill_repeats:  # prefill times only: host, persisted and scratch disk in turn, each ``--prefill-repeats`` times
        disk_engine = Engine(lm, EngineConfig(**{**_fields(base), "offload": "disk", "selector": "block", "scratch_dir": args.scratch}),
                             show_progress=False)
        # host memory; a persisted store (fsynced and committed, then reopened); a scratch store
        # (what ``generate --offload disk`` writes without --store)
        times: dict[str, list[float]] = {"host": [], "disk": [], "scratch": []}
        phases: dict[str, list[dict[str, float]]] = {k: [] for k in times}  # host time by phase, ms
        for _ in range(args.prefill_repeats):
            doc, seconds = timed_prefill(host_engine, ids, None)
            doc.close()
            times["host"].append(seconds)
            phases["host"].append({k: round(v, 1) for k, v in doc.prefill_phases_ms.items()})
            work = Path(tempfile.mkdtemp(prefix="rcengine-disk-bench-", dir=args.scratch))
            try:
                doc, seconds = timed_prefill(disk_engine, ids, work / "doc")
                doc.close()
                times["disk"].append(seconds)
                phases["disk"].append({k: round(v, 1) for k, v in {**doc.prefill_phases_ms, **doc.prefill_writes}.items()})
                doc, seconds = timed_prefill(disk_engine, ids, None)
                doc.close()
                times["scratch"].append(seconds)
                phases["scratch"].append({k: round(v, 1) for k, v in {**doc.prefill_phases_ms, **doc.prefill_writes}.items()})
            finally:
                shutil.rmtree(work, ignore_errors=True)
        if args.profile:  # one more prefill to disk under cProfile: where the host's time goes, by function
            _profile_prefill(disk_engine, ids, Path(args.out) / f"prefill_profile_{n}.txt", args.scratch)
        host_s, disk_s = statistics.median(times["host"]), statistics.median(times["disk"])
        add({"variant": "prefill, host and disk alternately", "host_seconds": times["host"], "disk_seconds": times["disk"],
             "scratch_seconds": times["scratch"], "median_vs_host": disk_s / host_s,
             "scratch_median_vs_host": statistics.median(times["scratch"]) / host_s, "phases_ms": phases})
        return
    doc, host_s = timed_prefill(host_engine, ids, None)
    add({"variant": "prefill to host memory", "seconds": host_s})
    for selector, block in (("exact", None), ("block", b)):
        doc.configure(selector=selector, select_block=block)
        answer_row(doc, question, args.tokens, cold=False)  # warm-up (kernels, graphs)
        add({"variant": f"host {selector}" + (f" {block}" if block else ""), **answer_row(doc, question, args.tokens, cold=False)})
        if args.profile and selector == "block":
            answer_row(doc, question, args.tokens, cold=False, profile=Path(args.out) / f"host_profile_{n}.txt")
    doc.close()
    del doc

    work = Path(tempfile.mkdtemp(prefix="rcengine-disk-bench-", dir=args.scratch))
    try:
        # Prefilled with the block selector, so that the store holds its bounds for the reopen.
        disk_engine = Engine(lm, EngineConfig(**{**_fields(base), "offload": "disk", "selector": "block", "cache_bytes": cache_bytes}),
                             show_progress=False)
        doc, disk_s = timed_prefill(disk_engine, ids, work / "doc")
        store_bytes = sum(f.stat().st_size for f in (work / "doc").rglob("*") if f.is_file())
        add({"variant": "prefill to disk (persisted store)", "seconds": disk_s, "vs_host": disk_s / host_s, "store_bytes": store_bytes})
        step_logical = None
        disk_selectors = ("block", "exact-block", "exact") if n <= args.exact_max else ("block", "exact-block")
        for selector in disk_selectors:
            doc.configure(selector=selector, select_block=b if selector != "exact" else None)
            answer_row(doc, question, args.tokens, cold=True)  # warm-up
            cold = answer_row(doc, question, args.tokens, cold=True)
            warm = answer_row(doc, question, args.tokens, cold=False)
            if args.profile and selector == "block":
                answer_row(doc, question, args.tokens, cold=False, profile=Path(args.out) / f"disk_profile_{n}.txt")
            name = f"disk {selector}" + (f" {b}" if selector != "exact" else "")
            add({"variant": f"{name} cold", "cache_bytes": cache_bytes, **cold})
            add({"variant": f"{name} warm", "cache_bytes": cache_bytes, **warm})
            if selector == "block":
                step_logical = sum(cold["kv_logical_per_step"].values())
        doc.close()
        del doc
        probe = DiskTier.open(Artifact.open(work / "doc").kv_location)
        base_open = probe.store.ledger.bytes_read  # what opening the store reads: metadata, positions, each layer's last partial chunk
        probe.close()
        for selector in () if args.no_reopen else disk_selectors:
            cfg = EngineConfig(**{**_fields(base), "offload": "disk", "selector": selector})
            engine = Engine(lm, cfg, show_progress=False)
            _sync(lm)
            t0 = time.perf_counter()
            doc = engine.open(work / "doc")
            _sync(lm)
            open_s = time.perf_counter() - t0
            kv_at_open = doc.state.tier.store.ledger.bytes_read - base_open  # KV rows read to rebuild selection state
            selection_file = work / "doc" / "selection.safetensors"
            saved = selection_file.stat().st_size if selection_file.exists() and selector == "block" else 0
            answer_row(doc, question, args.tokens, cold=False)  # warm-up
            row = answer_row(doc, question, args.tokens, cold=False)
            add({"variant": f"reopened {selector}" + (f" {b}" if selector != "exact" else ""), "open_s": open_s,
                 "selection_state_bytes_read": saved, "kv_rows_read_at_open": kv_at_open,
                 "store_open_read": base_open, "cache_bytes": DEFAULT_CACHE_BYTES,
                 "selection_read_over_step_logical": (saved + kv_at_open) / step_logical if step_logical else None, **row})
            doc.close()
            del doc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fields(cfg: EngineConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK_TOKENS, help="tokens per store block")
    parser.add_argument("--tokens", type=int, default=16, help="decode steps per answer")
    parser.add_argument("--exact-max", type=int, default=32768,
                        help="longest length at which token-level selection runs on the disk tier (it reads most blocks each step)")
    parser.add_argument("--synthetic", choices=["8b"], default=None, help="an 8B-shaped random model (GPU) instead of the embedded one")
    parser.add_argument("--profile", action="store_true",
                        help="profile a warm block-selection answer on each tier per length (with --prefill-repeats: a prefill to disk)")
    parser.add_argument("--cache-mb", type=int, default=None,
                        help="the fresh store's block cache (default: enough for one answer's blocks, at least the default)")
    parser.add_argument("--prefill-repeats", type=int, default=0,
                        help="only time prefills: to host memory, to a persisted store and to a scratch store, in turn, this many times each")
    parser.add_argument("--no-reopen", action="store_true", help="skip the reopened-store variants")
    parser.add_argument("--scratch", default=None, help="where the stores are written (default: the system's temporary folder)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.synthetic:
        from .synthetic import SHAPE_8B, random_llama

        lm = random_llama(SHAPE_8B, max(lengths) + 4096, "cuda")
    else:
        from ...engine.hf.loader import load_model

        lm = load_model(None)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "disk_decode.json"
    out = {"meta": {"date": date.today().isoformat(), "machine": platform.node(), "cpus": os.cpu_count(),
                    "device": str(lm.device), "model": args.synthetic or "embedded", "budget": args.budget, "block": args.block,
                    "tokens": args.tokens, "torch": torch.__version__}, "rows": []}

    def save() -> None:
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, path)

    with torch.no_grad():
        for n in lengths:
            run_length(lm, n, args, out, save)
    save()


if __name__ == "__main__":
    main()

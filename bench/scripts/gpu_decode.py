"""Decode speed with the KV off the GPU: an 8B-shaped random model, side by side in one run.

For each length (default 8K, 32K and 128K tokens of random ids): one prefill by stock transformers
(SDPA, DynamicCache on the GPU), whose decode is the baseline; the same keys and values become an
rcengine document with its mid-region in pinned host memory (``Engine.adopt``: no second
prefill).  Then, side by side: ``dense`` from host (reads every mid row each step), and ``topk``
and ``rc`` at 1 % with each selector (``exact``: keys on the GPU; ``block``: 16-token block bounds
on the GPU), each decoding with CUDA graphs; ``rc`` exact once more without graphs.  Then a
1M-token case whose mid KV is written to the host tier directly (random rows, no prefill; the
host's 128 GiB cannot hold 1M tokens of 32 layers, so layers share 4 distinct row buffers: the
bytes read per step are those of 32 distinct layers).

Per variant: ms per decoded token (median of rounds, each after a warm-up answer that captures
its graphs), bytes per step by tier (KV read, logical and physical, and selection reads), and the
device memory held for the KV side (anchors, selection state, summaries).  Beside them, dense
with the KV on the device (``--offload device``) against its HBM floor, for each split of its rows
in ``--waves``.  ``--profile``: rc-exact and rc-block steps at the longest length (``profile.txt``,
``profile_block.txt``), device dense (``profile_device_dense_N_W.txt``).  Each length and variant
has its own deadline; results are written after each row.

Batched (``gpu_batch.py``): ``--batch`` questions of one document together (``ask_many``, at
``--batch-lengths``; ``--stage on,off``: the union of their units read through the staging copy or
row by row, side by side) and ``--documents`` 32K documents together (``generate_many``), each
against one at a time (tokens/s).

    python bench/scripts/gpu_decode.py [--lengths 8192,32768,131072] [--million] [--tokens 32] [--batch 16] [--documents 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from ...engine.config import EngineConfig
from ...engine.decode import kernels
from ...engine.hf import model_ops
from ...engine.hf.integration import model_call, stock_prefill
from ...engine.qa.document import Document
from ...engine.qa.engine import Engine
from ...engine.sampling import SamplingConfig
from .gpu_batch import run_batch, run_documents
from .million_doc import million_document
from .synthetic import SHAPE_8B, random_llama

# (method, budget, selector, CUDA graphs, fused kernels); the last two are ablations of rc-exact.
VARIANTS = [("dense", None, "exact", True, True), ("topk", 0.01, "exact", True, True), ("topk", 0.01, "block", True, True),
            ("rc", 0.01, "exact", True, True), ("rc", 0.01, "block", True, True), ("rc", 0.01, "exact", True, False),
            ("rc", 0.01, "exact", False, True)]
PCIE_BYTES_PER_S = 55e9  # pinned host-to-device bandwidth measured on the GPU machine
QUESTION_TOKENS = 16


def variant_key(method: str, selector: str, graphs: bool, fused: bool) -> str:
    """The name ``--variants`` picks a row of VARIANTS by: dense, topk-exact, rc-block, rc-pytorch, rc-eager..."""
    if method == "dense":
        return "dense"
    return f"{method}-" + ("eager" if not graphs else "pytorch" if not fused else selector)


class Report:
    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.data = path, {"meta": meta, "rows": [], "notes": []}

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.flush()
        print(json.dumps(row), flush=True)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()
        print(text, flush=True)

    def flush(self) -> None:
        tmp = self.path.with_suffix(".part")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def stock_decode_ms(lm, cache, logits: torch.Tensor, start: int, tokens: int) -> float:  # noqa: ANN001
    """ms per token of stock transformers' greedy decode over its own cache (eager)."""
    token, times = int(logits[0].argmax()), []
    with torch.no_grad():
        for i in range(tokens):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model_call(lm.model, torch.tensor([[token]], device=lm.device), cache,
                             position_ids=torch.tensor([[start + i]], device=lm.device))
            token = int(out.logits[0, -1].argmax())
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])


def time_variant(doc: Document, question: list[int], tokens: int, rounds: int) -> dict:
    """A warm-up answer (captures graphs), then ``rounds`` answers of ``tokens`` decode steps."""
    sampling = SamplingConfig(max_new_tokens=tokens + 1, ignore_eos=True)
    doc.ask(question, sampling)
    ms, stats = [], None
    for _ in range(rounds):
        answer = doc.ask(question, sampling)
        ms.append(answer.stats["timings_ms"]["decode_per_token"])
        stats = answer.stats
    per_step = stats["bytes_per_decode_step"]
    return {"ms_per_token": statistics.median(ms), "ms_rounds": ms,
            "kv_bytes_per_step": {t: v["logical"] for t, v in per_step["by_tier"].items()},
            "kv_physical_bytes_per_step": {t: v["physical"] for t, v in per_step["by_tier"].items()},
            "selection_bytes_per_step": per_step["index"], "device_bytes": stats["memory_bytes"],
            "kv_side_device_bytes": sum(stats["memory_bytes"].values()), "graphs_captured": doc.runner.captures}


def run_length(lm, n: int, args, report: Report, deadline: float) -> None:  # noqa: ANN001
    vocab = lm.model.config.vocab_size
    ids = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    question = ids[-QUESTION_TOKENS:]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    cache, logits = stock_prefill(lm.model, ids, 4096 if n >= 65536 else 2048)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    stock = stock_decode_ms(lm, cache, logits, n, args.tokens)
    report.add({"tokens": n, "variant": "stock transformers (KV on GPU, SDPA, eager)", "ms_per_token": stock,
                "prefill_s": prefill_s, "kv_side_device_bytes": kv_bytes})
    for layer in cache.layers:  # back to the prefill's own length (the stock decode appended tokens)
        layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
    if args.device_dense:
        device_dense(lm, ids, cache, logits, stock, args, report)
    engine = Engine(lm, EngineConfig(method="rc", budget=0.01, offload="cpu", selector="exact"), show_progress=False)
    t0 = time.perf_counter()
    doc = engine.adopt(ids, [(layer.keys, layer.values) for layer in cache.layers], logits)
    adopt_s = time.perf_counter() - t0
    del cache
    torch.cuda.empty_cache()
    mid_kv = doc.state.mid_len * doc.state.num_layers * doc.state.num_kv_heads * doc.state.tier.layout.row_bytes
    report.note(f"{n} tokens: stock prefill {prefill_s:.1f} s; offloading it ({mid_kv / 1e9:.2f} GB of mid KV to pinned host "
                f"memory, exact selection state, centroid summaries) {adopt_s:.1f} s")
    for (method, budget, selector, graphs, fused), ops in ((v, o) for v in VARIANTS for o in args.model_ops):
        if args.variants and variant_key(method, selector, graphs, fused) not in args.variants:
            continue
        if time.perf_counter() > deadline:
            report.note(f"{n} tokens: deadline reached before {method} {selector}")
            break
        doc.configure(method=method, budget=budget if budget else 0.01, selector=selector, fused=fused)
        doc.runner.use_graphs = graphs
        model_ops.ENABLED = ops
        doc.runner.drop_graphs()
        tokens = args.dense_tokens if method == "dense" else args.tokens
        name = f"{method}" + (f" {budget:.0%} {selector}" if budget else "") + ("" if graphs else ", no graphs") + \
            ("" if fused else ", PyTorch rule") + ("" if ops else ", the model's own norm/RoPE/SiLU ops")
        row = {"tokens": n, "variant": name, "tier": "cpu (pinned, zero-copy)", "model_ops_fused": ops,
               **time_variant(doc, question, tokens, args.rounds)}
        row["vs_stock"] = row["ms_per_token"] / stock
        if method == "dense":
            physical = sum(row["kv_physical_bytes_per_step"].values())
            row["pcie_floor_ms"] = 1e3 * physical / PCIE_BYTES_PER_S
            row["vs_pcie_floor"] = row["ms_per_token"] / row["pcie_floor_ms"]
        report.add(row)
    model_ops.ENABLED = True
    if args.batch and n in args.batch_lengths:
        run_batch(doc, ids, args, report, deadline, time_variant, QUESTION_TOKENS)
    if args.profile and n == max(args.lengths):
        doc.configure(method="rc", budget=0.01, selector="exact", fused=True)
        profile(doc, question, Path(args.out) / "profile.txt", "rc 1 % exact")
        doc.configure(method="rc", budget=0.01, selector="block", fused=True)
        profile(doc, question, Path(args.out) / "profile_block.txt", "rc 1 % block")
    doc.close()
    torch.cuda.empty_cache()


def hbm_bytes_per_s() -> float:
    """Device memory read bandwidth, measured: a sum over a 4 GiB buffer (best of five)."""
    x = torch.ones(1 << 31, dtype=torch.bfloat16, device="cuda")
    best = math.inf
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del x
    torch.cuda.empty_cache()
    return (1 << 31) * 2 / best


def device_dense(lm, ids: list[int], cache, logits: torch.Tensor, stock: float, args, report: Report) -> None:  # noqa: ANN001
    """``--offload device --method dense``: the KV in device memory, every row read each step, beside its
    floor: the weights a token reads (all but the embedding table) and all the KV, once, at the
    measured HBM bandwidth."""
    n = len(ids)
    engine = Engine(lm, EngineConfig(method="dense", offload="device"), show_progress=False)
    doc = engine.adopt(ids, [(layer.keys, layer.values) for layer in cache.layers], logits)
    weights = sum(p.numel() * p.element_size() for name, p in lm.model.named_parameters() if "embed_tokens" not in name)
    kv = doc.state.mid_len * doc.state.num_layers * doc.state.num_kv_heads * doc.state.tier.layout.row_bytes
    bw = hbm_bytes_per_s()
    default = kernels.RESIDENT_WAVES
    try:
        # --waves: the splits of the rows over the kernels' programs, side by side (about W programs
        # per multiprocessor; 0: the host tier's up to MAX_SLICES slices).
        # --model-ops: the layers' norms, RoPE and SiLU as rcengine's kernels (on) or the model's code (off).
        for waves, ops in ((w, o) for w in args.waves for o in args.model_ops):
            kernels.RESIDENT_WAVES = waves
            model_ops.ENABLED = ops
            doc.runner.drop_graphs()
            split = (f"{waves} programs per multiprocessor" if waves else f"up to {kernels.MAX_SLICES} slices") + \
                ("" if ops else ", the model's own norm/RoPE/SiLU ops")
            row = {"tokens": n, "variant": f"dense, KV on the device (--offload device), {split}", "tier": "device",
                   "model_ops_fused": ops, **time_variant(doc, ids[-QUESTION_TOKENS:], args.tokens, args.rounds)}
            row.update({"weight_bytes": weights, "kv_bytes": kv, "hbm_bytes_per_s": bw, "hbm_floor_ms": 1e3 * (weights + kv) / bw})
            row["vs_hbm_floor"] = row["ms_per_token"] / row["hbm_floor_ms"]
            row["vs_stock"] = row["ms_per_token"] / stock
            report.add(row)
            if args.profile and ops:
                profile(doc, ids[-QUESTION_TOKENS:], Path(args.out) / f"profile_device_dense_{n}_{waves}.txt", f"dense, device, {split}")
    finally:
        kernels.RESIDENT_WAVES = default
        model_ops.ENABLED = True
        doc.close()
        del doc
        torch.cuda.empty_cache()


def profile(doc: Document, question: list[int], path: Path, label: str) -> None:
    """Kernel times of the document's decode steps as configured, captured (graphs) and eager, one table each."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    parts = []
    for graphs in (True, False):
        doc.runner.use_graphs = graphs
        doc.ask(question, SamplingConfig(max_new_tokens=3, ignore_eos=True))
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            doc.ask(question[-1:], SamplingConfig(max_new_tokens=9, ignore_eos=True))
        parts.append(f"== {label}, {'CUDA graphs' if graphs else 'eager'}, 8 decode steps (and one 1-token question step)\n"
                     + prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    path.write_text("\n\n".join(parts))
    doc.runner.use_graphs = True


def run_million(lm, n: int, args, report: Report, deadline: float) -> None:  # noqa: ANN001
    report.note(f"{n} tokens: mid KV written to the host tier directly (random rows; 32 layers share 4 distinct row buffers "
                "because host memory cannot hold 32 distinct ones); no prefill, no stock or dense baseline")
    question = list(range(5, 5 + QUESTION_TOKENS))
    for selector in ("block", "exact"):
        if time.perf_counter() > deadline:
            report.note(f"{n} tokens: deadline reached before selector {selector}")
            break
        t0 = time.perf_counter()
        doc = million_document(lm, n, selector)
        report.note(f"{n} tokens, {selector}: document built in {time.perf_counter() - t0:.0f} s")
        kv_bytes = n * doc.state.num_layers * doc.state.num_kv_heads * doc.state.tier.layout.row_bytes
        for method in ("topk", "rc"):
            if time.perf_counter() > deadline:
                break
            doc.configure(method=method, budget=0.01, selector=selector)
            row = {"tokens": n, "variant": f"{method} 1% {selector}", "tier": "cpu (pinned, zero-copy; layers aliased)",
                   **time_variant(doc, question, args.tokens, args.rounds), "mid_kv_bytes": kv_bytes}
            row["kv_side_vs_kv"] = row["kv_side_device_bytes"] / kv_bytes
            report.add(row)
        doc.close()
        del doc
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--million", type=int, default=1 << 20, help="mid tokens of the directly written case (0: skip)")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps per timed answer")
    parser.add_argument("--dense-tokens", type=int, default=8, help="decode steps per timed dense answer")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--batch", type=int, default=16, help="questions answered together (ask_many) at --batch-lengths (0: skip)")
    parser.add_argument("--batch-lengths", default="32768,131072")
    parser.add_argument("--stage", default="on", help="on, off or on,off (side by side): batched questions read the union of "
                        "their units through a staging copy (engine/decode/stage.py) or row by row (layer.union_read)")
    parser.add_argument("--batch-variants", default="block-graph,block-eager,exact-graph",
                        help="batched rows: selector-graph or selector-eager, for block and exact")
    parser.add_argument("--documents", type=int, default=4, help="documents of 32K continued together (generate_many; 0: skip)")
    parser.add_argument("--variants", default="", help="rows of batch 1 to time (default: all): dense,topk-exact,topk-block,"
                        "rc-exact,rc-block,rc-pytorch,rc-eager")
    parser.add_argument("--waves", default=f"0,{kernels.RESIDENT_WAVES}",
                        help="splits of the device rows to time side by side: programs per multiprocessor (0: up to MAX_SLICES slices)")
    parser.add_argument("--device-dense", type=int, default=1, help="also dense with the KV on the device (0: skip)")
    parser.add_argument("--model-ops", default="on", help="on, off or on,off (side by side): the decoder layer's norms, rotary "
                        "embedding and SiLU product as rcengine's kernels or the model's own code (batch 1 and device dense)")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting work after this long")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.batch_lengths = [int(x) for x in args.batch_lengths.split(",") if x]
    args.variants = {x for x in args.variants.split(",") if x}
    args.waves = [int(x) for x in args.waves.split(",") if x]
    args.model_ops = [{"on": True, "off": False}[x] for x in args.model_ops.split(",") if x]
    args.stage = [{"on": True, "off": False}[x] for x in args.stage.split(",") if x]
    args.batch_variants = [tuple(x.split("-")) for x in args.batch_variants.split(",") if x]
    known = {variant_key(m, s, g, f) for m, _, s, g, f in VARIANTS}
    if args.variants - known:
        parser.error(f"unknown variants {sorted(args.variants - known)}: use some of {sorted(known)}")
    start = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    positions = max([*args.lengths, args.million + 4096]) + 4096
    lm = random_llama(SHAPE_8B, positions, "cuda")
    meta = {"date": date.today().isoformat(), "machine": f"{platform.node()} ({os.cpu_count()} CPU cores, {torch.cuda.get_device_name(0)})",
            "torch": torch.__version__, "model": "Llama-3-8B shape (32 layers, 32 q / 8 KV heads of 128), random bf16 weights, "
            f"vocabulary {lm.model.config.vocab_size}", "question_tokens": QUESTION_TOKENS, "tokens": args.tokens, "rounds": args.rounds}
    report = Report(Path(args.out) / "gpu_decode.json", meta)
    share = (args.budget_s - (time.perf_counter() - start)) / (len(args.lengths) + (2 if args.million else 0))
    for i, n in enumerate(args.lengths):
        try:
            run_length(lm, n, args, report, time.perf_counter() + share * (i + 1.5))
        except Exception as e:  # one length's failure must not lose the others' results
            report.note(f"{n} tokens failed: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    if args.documents and time.perf_counter() - start > args.budget_s - 120:
        report.note(f"{args.documents} documents together: skipped, under 120 s of the budget left")
    elif args.documents:
        try:
            run_documents(lm, 32768, args.documents, args, report, QUESTION_TOKENS)
        except Exception as e:
            report.note(f"{args.documents} documents together failed: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    if args.million:
        try:
            run_million(lm, args.million, args, report, start + args.budget_s)
        except Exception as e:
            report.note(f"{args.million} tokens failed: {type(e).__name__}: {e}")
    print(f"{'tokens':>8} {'variant':<44}{'ms/token':>10}{'vs stock':>9}{'KV MB/step':>12}{'sel MB/step':>12}{'KV-side GB':>11}")
    for r in report.data["rows"]:
        kv = sum(r.get("kv_bytes_per_step", {}).values()) / 1e6
        print(f"{r['tokens']:>8} {r['variant']:<44}{r['ms_per_token']:>10.2f}{r.get('vs_stock', math.nan):>9.3f}{kv:>12.1f}"
              f"{r.get('selection_bytes_per_step', 0) / 1e6:>12.1f}{r.get('kv_side_device_bytes', 0) / 1e9:>11.2f}")


if __name__ == "__main__":
    main()

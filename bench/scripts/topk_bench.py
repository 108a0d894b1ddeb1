"""Top-K of the selectors on the GPU, side by side in one run: torch.topk, the engine's one-program
kernel (``engine.decode.top``: bisection for the count-th score, then a sort of the chosen; rows of
at most ``top.TOP_MAX``) and a candidate in two stages (:func:`two_stage_top`: the best of each
chunk, then of those; exact), at the shapes a decode step of the 8B shape (8 KV heads) ranks: blocks of 16
(block selector) and single keys (exact), 1 % of 32K, 128K and 1M tokens, for 1 and 16 queries,
over rows of a power of two and over the rows a captured plan ranks (``PLAN_HORIZON`` more; the
kernel pads them to the next power of two), the kernel with 4 to 32 warps side by side.  Each timing is the median of rounds of a CUDA graph of 20 calls.

    python -m rcengine.bench.scripts.topk_bench [--out DIR]      # DIR/topk_bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from datetime import date
from pathlib import Path

import torch

from ...engine.decode import top
from ...engine.decode.state import PLAN_HORIZON

CALLS = 20
# The two-stage candidate's chunks: at least TOPK_CHUNK and 8 ``count``.  On the H100 it was slower
# than one torch.topk at every shape but one (blocks at 128K, one query: 0.91x); not used.
TOPK_CHUNK = 1024
WARPS = (4, 8, 16, 32)  # the kernel's program widths timed side by side


def two_stage_top(s: torch.Tensor, count: int) -> torch.Tensor:
    """Indices ``(..., count)`` of the ``count`` largest of ``s: (..., n)``, best first, in two
    stages over chunks where a row has at least four (else torch.topk)."""
    n = s.shape[-1]
    chunk = max(TOPK_CHUNK, 1 << (8 * count - 1).bit_length())
    if n < 4 * chunk:
        return s.topk(count, dim=-1).indices
    pieces = math.ceil(n / chunk)
    padded = torch.nn.functional.pad(s, (0, pieces * chunk - n), value=-math.inf)
    v, i = padded.view(*s.shape[:-1], pieces, chunk).topk(count, dim=-1)  # (..., pieces, count)
    i = i + torch.arange(0, pieces * chunk, chunk, device=s.device)[:, None]
    best = v.flatten(-2).topk(count, dim=-1).indices
    return i.flatten(-2).gather(-1, best).clamp_max(n - 1)  # a padding entry ranks after every real one


def time_us(fn, rounds: int = 7) -> float:  # noqa: ANN001
    """Microseconds per call of ``fn`` (capture-safe), from CUDA graphs of CALLS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / CALLS)
    return statistics.median(times)


def time_row(gen: torch.Generator, tokens: int, unit: int, queries: int, n: int, count: int) -> dict:
    """torch.topk, the two-stage candidate and, for rows of at most TOP_MAX, the kernel with each
    of WARPS warps, on ``(queries, 8, n)`` random scores."""
    s = torch.randn(queries, 8, n, device="cuda", generator=gen)
    one = time_us(lambda: s.topk(count, dim=-1).indices)
    two = time_us(lambda: two_stage_top(s, count))
    want = s.topk(count, dim=-1).indices
    same = bool(torch.equal(two_stage_top(s, count).sort(-1).values, want.sort(-1).values))
    row = {"tokens": tokens, "unit": unit, "queries": queries, "n": n, "count": count,
           "one_stage_us": one, "two_stage_us": two, "ratio": two / one, "same_set": same}
    if n <= top.TOP_MAX:
        width = 1 << (n - 1).bit_length()
        row["kernel_warps"] = top.top_warps(width)
        row["kernel_us"] = time_us(lambda: top.top_units(s, count))
        row["kernel_ratio"] = row["kernel_us"] / one
        row["kernel_same"] = bool(torch.equal(top.top_units(s, count), want))
        row["kernel_us_by_warps"] = {w: time_us(lambda w=w: top.top_units(s, count, warps=w)) for w in WARPS}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args()
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for tokens in (32768, 131072, 1 << 20):
        for unit in (16, 1):
            for queries in (1, 16):
                count = max(1, math.ceil(0.01 * tokens / unit))
                # The row a captured plan ranks covers PLAN_HORIZON rows past the mid-region; the
                # power-of-two row is the earlier calls' shape.
                for n in dict.fromkeys((tokens // unit, math.ceil((tokens + PLAN_HORIZON) / unit))):
                    if n != tokens // unit and n > top.TOP_MAX:
                        continue
                    rows.append(time_row(gen, tokens, unit, queries, n, count))
                    print(json.dumps(rows[-1]), flush=True)
    meta = {"date": date.today().isoformat(), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "topk_chunk": TOPK_CHUNK, "top_max": top.TOP_MAX}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "topk_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

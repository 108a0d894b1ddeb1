"""How far RoPE scaling set in the configuration carries SmolLM2-135M-Instruct: dense accuracy on
single needles (and one-of-several-keys needles) of the eval split, per context length and YaRN
factor.  Lengths where dense attention keeps at least half of them are worth benchmarking.

    python -m rcengine.bench.scripts.yarn_needles [--lengths 8192,16384,32768] [--factors 1,2,4] [--cases 12] [--out DIR]

Factor 1 is the model as shipped (8,192 positions; longer lengths are skipped for it).  Each
factor's model is a sibling of the converted checkpoint folder with ``rope_parameters`` set to YaRN
(``rope_type`` yarn, ``factor``, ``original_max_position_embeddings`` 8192, the model's
``rope_theta``) and ``max_position_embeddings`` raised: what a user sets in a folder's config.json.
``--haystacks`` picks the eval split's text (what bench-io uses) and/or RULER's noise sentences.  Greedy answers through rcengine's dense method with the KV on the compute device.
Writes ``DIR/yarn_needles.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from ...engine.config import EngineConfig
from ...engine.hf.loader import load_model
from ...engine.hf.gguf import convert_gguf
from ...engine.hf.models import SMOLLM2_SHA256, smollm2_gguf, yarn_variant
from ...engine.qa.engine import Engine
from ...engine.sampling import SamplingConfig
from ..haystacks import corpus_haystack, eval_documents, noise_haystack
from ..tasks import TaskGenerator, score

TASKS = ("niah_single_number", "niah_single_word", "niah_multikey")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--factors", default="1,2,4")
    parser.add_argument("--cases", type=int, default=12, help="cases per length and factor (tasks in turn)")
    parser.add_argument("--haystacks", default="text", help="text (the eval split's documents), noise (RULER's repeated "
                        "sentences), or both, comma-separated")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    factors = [float(x) for x in args.factors.split(",")]
    base = convert_gguf(smollm2_gguf(), expect_sha256=SMOLLM2_SHA256, log=print)
    rows = []
    for factor in factors:
        folder = base if factor == 1 else yarn_variant(base, factor)
        lm = load_model(folder)
        count = lambda s: len(lm.tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        engine = Engine(lm, EngineConfig(method="dense", offload="device"), show_progress=False)
        for haystack, length in [(h, n) for h in args.haystacks.split(",") for n in lengths]:
            if length + 32 > lm.max_positions:
                continue
            source = corpus_haystack(eval_documents()) if haystack == "text" else noise_haystack
            gen = TaskGenerator("eval", source, count)
            t0 = time.perf_counter()
            correct, tokens = 0.0, []
            for case in range(args.cases):
                task = TASKS[case % len(TASKS)]
                ex = gen.example(task, length, 1000 + case)
                doc = engine.prefill(ex.context)
                answer = doc.ask(ex.question, SamplingConfig(max_new_tokens=24, stop=("\n",)))
                doc.close()
                correct += score(answer.text, ex.answers, task)
                tokens.append(doc.tokens)
            row = {"factor": factor, "haystack": haystack, "length": length, "cases": args.cases, "accuracy": correct / args.cases,
                   "tokens_min": min(tokens), "tokens_max": max(tokens), "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del engine, lm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out = {"date": date.today().isoformat(), "machine": platform.node(), "device": torch.cuda.get_device_name(0)
           if torch.cuda.is_available() else "cpu", "tasks": TASKS, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "yarn_needles.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

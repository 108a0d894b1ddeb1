"""How far RoPE scaling set in the configuration carries SmolLM2-135M-Instruct: dense accuracy on
single needles (and one-of-several-keys needles) of the eval split, per context length and YaRN
factor.  Lengths where dense attention keeps at least half of them are worth benchmarking.

    python -m rcengine.bench.yarn_needles [--lengths 8192,16384,32768] [--factors 1,2,4] [--cases 12] [--out DIR]

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
import shutil
import time
import uuid
from datetime import date
from pathlib import Path

import torch

from ..engine.config import EngineConfig
from ..engine.hf.loader import load_model
from ..engine.hf.gguf import DONE_FILE, convert_gguf
from ..engine.hf.models import SMOLLM2_SHA256, smollm2_gguf
from ..engine.qa.engine import Engine
from ..engine.sampling import SamplingConfig
from .tasks import TaskGenerator, noise_haystack, corpus_haystack, eval_documents, score

TASKS = ("niah_single_number", "niah_single_word", "niah_multikey")


def yarn_variant(base: Path, factor: float) -> Path:
    """A sibling of the converted folder ``base`` whose configuration sets YaRN RoPE scaling by
    ``factor``; its other files are hard links to ``base``'s (copies where links cannot be made)."""
    folder = base.with_name(f"{base.name}-yarn{factor:g}")
    if (folder / DONE_FILE).is_file():
        return folder
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    trained = int(config["max_position_embeddings"])
    rope = dict(config.get("rope_parameters") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    config["rope_parameters"] = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": trained,
                                 "rope_theta": theta}
    config["max_position_embeddings"] = int(trained * factor)
    tmp = base.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        for p in base.iterdir():
            if p.name in ("config.json", DONE_FILE):
                continue
            try:
                os.link(p, tmp / p.name)
            except OSError:
                shutil.copy2(p, tmp / p.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        (tmp / DONE_FILE).write_text((base / DONE_FILE).read_text(encoding="utf-8"))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it first
            if not (folder / DONE_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


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

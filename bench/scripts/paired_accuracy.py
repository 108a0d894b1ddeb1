"""Accuracy of several variants on the same examples, example by example: which variant answers
which example, so that two variants can be compared on the examples where they differ (and against
the model's own dense attention there), not only by their means.

The examples are bench-io's (the eval split's tasks, ``--haystack`` noise or text, seeds
``0..examples-1`` as ``rcengine bench-io --examples N`` draws them); each is prefilled once into
host memory, then every variant answers its question greedily (at most ``--max-new-tokens``, stopped
at a newline) and is scored by RULER's rules.  Variants: ``method[:budget[:estimator]]``.

    python -m rcengine.bench.scripts.paired_accuracy [--model smollm2] [--length 7936] [--examples 6]
        [--variants dense,topk:0.02,rc:0.005:centroid,rc:0.005:learned] [--out bench/out]

Results: ``DIR/paired_accuracy.json`` (every answer, scores, and per pair of variants the examples
only one of them answered, with dense's score on those), written after each example.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from ...engine.config import EngineConfig
from ...engine.qa.engine import Engine
from ...engine.rule.feature_maps import EstimatorSpec
from ...engine.sampling import SamplingConfig
from ..haystacks import corpus_haystack, eval_documents, noise_haystack
from ..tasks import TASKS, TaskGenerator, score


def parse_variant(text: str) -> dict:
    method, _, rest = text.partition(":")
    budget, _, estimator = rest.partition(":")
    return {"name": text, "method": method, "budget": float(budget) if budget else None, "estimator": estimator or None}


def pairs_report(variants: list[str], rows: list[dict]) -> list[dict]:
    """Per pair of variants: examples both answered, only the first, only the second, neither
    (score 1 counts as answered), and dense's mean score on each one-sided set."""
    out = []
    for a, b in itertools.combinations(variants, 2):
        only_a = [r for r in rows if r["scores"][a] >= 1 > r["scores"][b]]
        only_b = [r for r in rows if r["scores"][b] >= 1 > r["scores"][a]]
        dense = lambda rs: sum(r["scores"]["dense"] for r in rs) / len(rs) if rs and "dense" in rs[0]["scores"] else None  # noqa: E731
        out.append({"a": a, "b": b, "both": sum(r["scores"][a] >= 1 and r["scores"][b] >= 1 for r in rows),
                    "only_a": len(only_a), "only_b": len(only_b), "neither": sum(r["scores"][a] < 1 and r["scores"][b] < 1 for r in rows),
                    "dense_on_only_a": dense(only_a), "dense_on_only_b": dense(only_b)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", type=int, default=7936)
    ap.add_argument("--examples", type=int, default=6, help="seeds per task")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--haystack", default="noise", choices=("noise", "text"))
    ap.add_argument("--variants", default="dense,topk:0.005,topk:0.02,rc:0.005:centroid,rc:0.005:learned")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants.split(",")]
    engine = Engine.load(args.model, EngineConfig(method="dense", offload="cpu", estimator=EstimatorSpec("centroid")), show_progress=False)
    lm = engine.lm
    count = lambda s: len(lm.tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    gen = TaskGenerator("eval", corpus_haystack(eval_documents()) if args.haystack == "text" else noise_haystack, count)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, stop=("\n",))
    names = [v["name"] for v in variants]
    report = {"date": date.today().isoformat(), "machine": f"{platform.node()} ({os.cpu_count()} CPU cores, {lm.device})",
              "model": lm.name, "length": args.length, "haystack": args.haystack, "variants": names, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "paired_accuracy.json"
    t_start = time.perf_counter()
    tasks = args.tasks.split(",")
    examples = [(task, seed) for seed in range(args.first_seed, args.first_seed + args.examples) for task in tasks]
    for i, (task, seed) in enumerate(examples):
        ex = gen.example(task, args.length, seed)
        question = list(lm.tokenizer(ex.question, add_special_tokens=False)["input_ids"])
        row = {"task": task, "seed": seed, "answers": {}, "scores": {}, "expected": ex.answers}
        with engine.prefill(ex.context) as doc:
            row["tokens"] = doc.tokens
            for v in variants:
                spec = EstimatorSpec(v["estimator"]) if v["estimator"] else None
                doc.configure(method=v["method"], budget=v["budget"], estimator=spec)
                text = doc.ask(question, sampling).text
                row["answers"][v["name"]] = text
                row["scores"][v["name"]] = score(text, ex.answers, task)
        report["rows"].append(row)
        rows = report["rows"]
        report["accuracy"] = {n: sum(r["scores"][n] for r in rows) / len(rows) for n in names}
        report["pairs"] = pairs_report(names, rows)
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        path.write_text(json.dumps(report, indent=1))
        print(f"[{i + 1}/{len(examples)}] {task} seed {seed}: " + ", ".join(f"{n} {row['scores'][n]:.2f}" for n in names)
              + f" ({report['seconds']:.0f} s)", flush=True)
    print(json.dumps(report["accuracy"], indent=1))
    for p in report["pairs"]:
        print(json.dumps(p))


if __name__ == "__main__":
    main()

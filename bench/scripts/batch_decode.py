"""Questions of one document answered one at a time (``Document.ask``) against all together
(``Document.ask_many``), side by side in one run: wall time, aggregate tokens/s, bytes asked for
and moved, and whether the answers agree.  Optionally several documents continued one at a time
(``Engine.generate``) against together (``Engine.generate_many``).

The default is what ``make demo`` runs: SmolLM2-135M-Instruct, its embedded document (CPython's
LICENSE.txt, 3,823 tokens), persisted to a store and read from the disk tier, rc at 1 % with its
learned maps, greedy, answers stopped at a newline.  The eight questions are rcengine's own.  Each
repeat runs both variants, in alternating order, with the block cache dropped before each.

    python -m rcengine.bench.scripts.batch_decode [--model smollm2] [--repeats 3] [--documents 4] [--out bench/out]

Results: ``DIR/batch_decode.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from ...engine.config import EngineConfig
from ...engine.demo import demo_prompt
from ...engine.qa.engine import Engine
from ...engine.rule.feature_maps import EstimatorSpec
from ...engine.sampling import SamplingConfig

QUESTIONS = [
    "Python was created as a successor of which language?",
    "Who created Python?",
    "In which country was Python created?",
    "In which year did Guido continue his work on Python at CNRI?",
    "In which town is CNRI?",
    "Which company did the Python core development team move to in May 2000?",
    "Which organization was formed in 2001 to own Python-related Intellectual Property?",
    "Under which license are Python software and documentation licensed?",
]


def _questions(template: str) -> list[str]:
    """The questions in the demo question's format (``\\nQuestion: ...\\nAnswer:``)."""
    head, _, _ = template.partition("Question:")
    return [f"{head}Question: {q}\nAnswer:" for q in QUESTIONS]


def _timed(fn):  # noqa: ANN001, ANN202
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _row(answers: list, seconds: float) -> dict:
    new = sum(a.new_tokens for a in answers)
    return {
        "seconds": round(seconds, 3), "new_tokens": new, "tokens_per_s": round(new / seconds, 2),
        "logical": sum(a.stats["bytes"]["logical"] for a in answers),
        "physical": sum(a.stats["bytes"]["physical"] for a in answers),
    }


def questions_run(engine: Engine, store: str, sampling: SamplingConfig, repeats: int) -> dict:
    demo = demo_prompt(engine.lm.name)
    questions = _questions(demo.question)
    runs = []
    with engine.open(store) as doc:
        for r in range(repeats):
            out = {}
            for variant in (("alone", "together") if r % 2 == 0 else ("together", "alone")):
                doc.drop_caches()
                if variant == "alone":
                    answers, seconds = _timed(lambda: [doc.ask(q, sampling) for q in questions])
                else:
                    answers, seconds = _timed(lambda: doc.ask_many(questions, sampling))
                out[variant] = (answers, seconds)
            alone, together = out["alone"], out["together"]
            row = {"alone": _row(*alone), "together": _row(*together), "speedup": round(alone[1] / together[1], 2),
                   "same_answers": [a.token_ids for a in alone[0]] == [a.token_ids for a in together[0]]}
            row["together"]["moved_once"] = together[0][0].stats["batch"]["bytes"]["physical"]
            runs.append(row)
            print(f"questions repeat {r}: alone {alone[1]:.2f} s, together {together[1]:.2f} s, x{row['speedup']}, "
                  f"same answers {row['same_answers']}", flush=True)
        answers = [{"question": q.strip(), "answer": a.text.strip()} for q, a in zip(QUESTIONS, out["together"][0])]
    return {"questions": len(questions), "runs": runs, "speedup_median": statistics.median(r["speedup"] for r in runs),
            "answers": answers}


def documents_run(engine: Engine, count: int, tokens: int, sampling: SamplingConfig) -> dict:
    """``count`` documents of ``tokens`` random token ids continued alone and together."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, engine.vocab_size, (tokens,), generator=gen).tolist() for _ in range(count)]
    alone, t_alone = _timed(lambda: [engine.generate(p, sampling) for p in prompts])
    together, t_together = _timed(lambda: engine.generate_many(prompts, sampling))
    decode_alone = sum(a.stats["timings_ms"]["decode_per_token"] * a.stats["decode_steps"] for a in alone) / 1e3
    decode_together = together[0].stats["batch"]["timings_ms"]["decode"] / 1e3
    row = {"documents": count, "tokens": tokens, "new_tokens": sampling.max_new_tokens,
           "alone_s": round(t_alone, 3), "together_s": round(t_together, 3),
           "decode_alone_s": round(decode_alone, 3), "decode_together_s": round(decode_together, 3),
           "decode_speedup": round(decode_alone / decode_together, 2),
           "same_tokens": [a.token_ids for a in alone] == [a.token_ids for a in together]}
    print(f"documents: decode alone {decode_alone:.2f} s, together {decode_together:.2f} s, x{row['decode_speedup']}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="rc")
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--estimator", default="learned")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--documents", type=int, default=0, help="also continue this many random documents alone and together")
    ap.add_argument("--document-tokens", type=int, default=4000)
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cfg = EngineConfig(method=args.method, budget=args.budget, offload="disk", estimator=EstimatorSpec(args.estimator))
    engine = Engine.load(args.model, cfg, show_progress=False)
    demo = demo_prompt(engine.lm.name)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, stop=demo.stop)
    report = {"date": date.today().isoformat(), "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads)", "device": str(engine.lm.device), "model": engine.lm.name,
              "method": args.method, "budget": args.budget, "estimator": args.estimator, "offload": "disk",
              "max_new_tokens": args.max_new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        engine.prefill(demo.document, store=store).close()
        report["questions"] = questions_run(engine, store, sampling, args.repeats)
    if args.documents:
        many = Engine.load(args.model, replace(cfg, offload="cpu"), show_progress=False)
        report["documents"] = documents_run(many, args.documents, args.document_tokens,
                                            SamplingConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_decode.json").write_text(json.dumps(report, indent=1))
    q = report["questions"]
    print(f"\n{q['questions']} questions, median speedup together over alone: x{q['speedup_median']}")
    for a in q["answers"]:
        print(f"  {a['question']} -> {a['answer']}")


if __name__ == "__main__":
    main()

"""gpu_decode.py's batched rows: many questions of one document (``Document.ask_many``) and several
documents (``Engine.generate_many``), each against one at a time, side by side in one run.

- :func:`run_batch`: ``--batch`` questions of the document at each of ``--batch-lengths``, for each
  of ``--batch-variants`` (selector, captured or eager) and each ``--stage`` (the union of the
  questions' units read once through the staging copy, or row by row); with ``--profile``, one
  batched answer's kernels at the longest of them (``profile_batch_N.txt``).
- :func:`run_documents`: ``--documents`` documents of 32K continued together, the documents'
  attention on one stream and on side streams; with ``--profile``, a step's kernels
  (``profile_documents_N.txt``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ...engine.config import EngineConfig
from ...engine.decode import stage
from ...engine.hf import group
from ...engine.qa.document import Document
from ...engine.qa.engine import Engine
from ...engine.sampling import SamplingConfig


def questions_of(ids: list[int], count: int, length: int) -> list[list[int]]:
    """``count`` different questions of ``length`` tokens: slices from the document's end."""
    return [ids[-length * (i + 1) :][:length] for i in range(count)]


def time_batch(doc: Document, questions: list[list[int]], tokens: int, rounds: int, one: float) -> dict:
    """The questions answered together (a warm-up, then ``rounds`` timed), against ``one``: ms per
    token of one question alone.  Decode tokens per second of each, and their ratio."""
    count = len(questions)
    sampling = SamplingConfig(max_new_tokens=tokens + 1, ignore_eos=True)
    doc.ask_many(questions, sampling)  # warm-up (captures the buckets' graphs)
    rates, batch = [], None
    for _ in range(rounds):
        answers = doc.ask_many(questions, sampling)
        batch = answers[0].stats["batch"]
        rates.append(count * batch["decode_steps"] / (batch["timings_ms"]["decode"] / 1e3))
    steps = batch["per_step"][1:]
    return {"ms_per_token": one, "batch": count, "ms_per_step_together": batch["timings_ms"]["decode_per_step"],
            "tokens_per_s_alone": 1e3 / one, "tokens_per_s_together": statistics.median(rates),
            "speedup": statistics.median(rates) * one / 1e3,
            "kv_bytes_per_step_together": {"asked_for": statistics.mean(s["logical"] for s in steps),
                                           "moved_once": statistics.mean(s["physical"] for s in steps)}}


def run_batch(doc: Document, ids: list[int], args, report, deadline: float,  # noqa: ANN001 (argparse namespace, gpu_decode.Report)
              time_variant: Callable[..., dict], question_tokens: int) -> None:
    """The batched rows of one document (see the module docstring)."""
    n = len(ids)
    questions = questions_of(ids, args.batch, question_tokens)
    default = doc.runner.capture_lanes
    alone: dict[str, float] = {}
    try:
        for (selector, mode), staged in ((v, s) for v in args.batch_variants for s in args.stage):
            if time.perf_counter() > deadline:
                report.note(f"{n} tokens: deadline reached before the batch of {args.batch}, {selector} {mode}")
                break
            captured = mode == "graph"
            doc.configure(method="rc", budget=0.01, selector=selector, fused=True)
            doc.runner.use_graphs = True
            doc.runner.capture_lanes = captured
            stage.ENABLED = staged
            doc.runner.drop_graphs()
            name = (f"rc 1% {selector}, {args.batch} questions together (ask_many, "
                    f"{'CUDA graph per bucket' if captured else 'eager'}{'' if staged else ', union read row by row'})")
            try:
                if selector not in alone:  # one question alone, as batch 1 decodes it (the same for both reads)
                    alone[selector] = time_variant(doc, questions[0], args.tokens, args.rounds)["ms_per_token"]
                report.add({"tokens": n, "variant": name, "tier": "cpu (pinned, zero-copy)", "staged": staged,
                            **time_batch(doc, questions, args.tokens, args.rounds, alone[selector])})
            except Exception as e:  # a failed variant must not lose the others
                report.note(f"{n} tokens, {name} failed: {type(e).__name__}: {e}")
        if args.profile and n == max(args.batch_lengths):
            doc.configure(method="rc", budget=0.01, selector="block", fused=True)
            doc.runner.capture_lanes, stage.ENABLED = True, True
            profile_batch(doc, questions, Path(args.out) / f"profile_batch_{n}.txt")
    finally:
        doc.runner.capture_lanes, stage.ENABLED = default, True


def kernels_per_step(run: Callable[[int], object], steps: int, title: str, path: Path) -> None:
    """Kernel time per decode step of ``run(new_tokens)`` (an answer, or answers together): the
    kernels of a run of ``steps + 1`` tokens less those of a run of 1 (what comes before the first
    decode step: prefill, questions, capture), divided by ``steps``; a table in ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def kernel_us(new_tokens: int) -> dict[str, float]:
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(new_tokens)
        return {e.key: e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0}

    short, long = kernel_us(1), kernel_us(steps + 1)
    per_step = sorted(((long.get(k, 0.0) - short.get(k, 0.0)) / steps, k) for k in set(long) | set(short))[::-1]
    lines = [f"== {title}: kernel time per decode step (a run of {steps + 1} tokens less one of 1, over {steps}), us", ""]
    lines += [f"{us:12.1f}  {name[:110]}" for us, name in per_step if abs(us) >= 1.0]
    lines.append(f"{sum(us for us, _ in per_step):12.1f}  in all")
    path.write_text("\n".join(lines) + "\n")


def profile_batch(doc: Document, questions: list[list[int]], path: Path, steps: int = 8) -> None:
    """Kernel times of one decode step of the questions together (captured, staged)."""
    run = lambda k: doc.ask_many(questions, SamplingConfig(max_new_tokens=k, ignore_eos=True))  # noqa: E731
    doc.runner.drop_graphs()
    run(steps + 1)  # captures the bucket's graph
    kernels_per_step(run, steps, f"rc 1 % block, {len(questions)} questions together, CUDA graph per bucket, staged union", path)
    alone = lambda k: doc.ask(questions[0], SamplingConfig(max_new_tokens=k, ignore_eos=True))  # noqa: E731
    alone(steps + 1)
    kernels_per_step(alone, steps, "rc 1 % block, one question alone, CUDA graph", path.with_name(path.stem + "_alone.txt"))


def run_documents(lm, n: int, count: int, args, report, question_tokens: int) -> None:  # noqa: ANN001
    """``count`` documents of ``n`` tokens continued one at a time (warm), then together (generate_many;
    a CUDA graph per set of documents going), the documents' attention on one stream and on side
    streams: the rate over all steps (the first captures) and over the warm steps after it."""
    vocab = lm.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n + i)).tolist() for i in range(count)]
    engine = Engine(lm, EngineConfig(method="rc", budget=0.01, offload="cpu", selector="block"), show_progress=False)
    sampling = SamplingConfig(max_new_tokens=args.tokens + 1, ignore_eos=True)
    ms_alone = []
    for p in prompts:  # alone: each document's decode graph captured by a question first, then its continuation timed
        with engine.prefill(p) as doc:
            doc.ask(p[-question_tokens:], SamplingConfig(max_new_tokens=4, ignore_eos=True))
            ms_alone.append(doc.continue_prompt(sampling).stats["timings_ms"]["decode_per_token"])
    one = statistics.mean(ms_alone)
    for streams in (False, True):  # the documents' attention on the step's stream, or each on a side stream
        group.STREAMS = streams
        together = engine.generate_many(prompts, sampling)
        batch = together[0].stats["batch"]
        rate = count * batch["decode_steps"] / (batch["timings_ms"]["decode"] / 1e3)
        step_ms = batch["timings_ms"]["per_step"]
        warm_ms = statistics.median(step_ms[1:]) if len(step_ms) > 1 else None
        warm_rate = count * 1e3 / warm_ms if warm_ms else None
        name = f"rc 1% block, {count} documents together (generate_many{', side streams' if streams else ''})"
        report.add({"tokens": n, "variant": name, "tier": "cpu (pinned, zero-copy)",
                    "ms_per_token": one, "ms_per_token_alone": ms_alone, "tokens_per_s_alone": 1e3 / one,
                    "tokens_per_s_together": rate, "speedup": rate * one / 1e3, "graphs_captured": batch["graphs_captured"],
                    "ms_per_step_together_warm": warm_ms, "tokens_per_s_together_warm": warm_rate,
                    "speedup_warm": warm_rate * one / 1e3 if warm_rate else None})
    if args.profile:
        run = lambda k: engine.generate_many(prompts, SamplingConfig(max_new_tokens=k, ignore_eos=True))  # noqa: E731
        kernels_per_step(run, 8, f"rc 1 % block, {count} documents together, side streams, CUDA graphs",
                         Path(args.out) / f"profile_documents_{n}.txt")
    group.STREAMS = True

"""Several answers decoded together: over one document (``Document.ask_many``, :func:`decode_batch`)
or one per document (``Engine.generate_many``, :func:`decode_group`).

The first step runs every question's tokens at once; then each step feeds one token per answer
still going.  Each answer keeps its own tail segment, sampling generator and stop rules, and stops
on its own; the document's rows that the step's queries select are read once for all of them
(:mod:`~rcengine.engine.decode.lanes`).  Greedy steps choose every answer's token with one
``argmax`` (one device-to-host copy per step).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...storage import ByteMeter
from ..decode.lanes import PAD_LANE, Lanes, bucket
from ..decode.runner import MAX_GRAPHS, StepRunner, capture
from ..hf.cache import RCCache
from ..hf.group import GroupCache
from ..hf.integration import group_forward
from ..sampling import SamplingConfig
from .generation import TokenStream


def _nothing(n: int = 1) -> None:
    """No progress to show."""


@dataclass
class BatchRun:
    """What the batch loop produced: each answer's stream, its queries and decode steps, and
    the batch's steps (meter step, answers in it) and times."""

    streams: list[TokenStream]
    queries: list[int]  # query tokens per answer: its question's, then one per decode step
    steps: list[int]  # decode steps per answer
    first_step: int  # the meter step of the questions' step
    step_answers: list[int] = field(default_factory=list)  # per batch decode step: answers in it
    step_s: list[float] = field(default_factory=list)  # per batch decode step: its time
    question_s: float = 0.0
    captures: int = 0  # CUDA graphs captured for the batch's steps (a group of documents')

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)

    def stepped(self, going: list[int], tokens: list[int], nxt: list[int | None], position: list[int], seconds: float,
                advance: Callable[[int], None]) -> None:
        """After a decode step of the answers ``going``: each takes its token (``nxt[b]``: the one to
        feed next, None once it is done) and moves on a position; the step's time and size are kept."""
        self.step_s.append(seconds)
        self.step_answers.append(len(going))
        for b, tok in zip(going, tokens):
            nxt[b] = self.streams[b].take(tok)
            position[b] += 1
            self.steps[b] += 1
            self.queries[b] += 1
        advance(sum(nxt[b] is None for b in going))

    def decode_s_of(self, answer: int) -> float:
        """Time of the steps answer ``answer`` took part in (its first ``steps[answer]``: answers
        only leave a batch)."""
        return sum(self.step_s[: self.steps[answer]])


def decode_batch(runner: StepRunner, tokenizer, eos: set[int], meter: ByteMeter, questions: list[list[int]],  # noqa: ANN001
                 start: int, sampling: SamplingConfig, lanes: Lanes, advance: Callable[[int], None] = _nothing) -> BatchRun:
    """Answer ``questions`` (token ids) appended at position ``start`` of the document, lane ``b``
    for question ``b``; ``advance(n)`` as ``n`` answers finish."""
    device = runner.state.device
    streams = [TokenStream(tokenizer, eos, sampling, device) for _ in questions]
    ids, positions, slots, owners, last = [], [], [], [], []
    for b, q in enumerate(questions):
        ids += q
        positions += range(start, start + len(q))
        slots += lanes.take(b, len(q))
        owners += [b] * len(q)
        last.append(len(ids) - 1)
    run = BatchRun(streams, [len(q) for q in questions], [0] * len(questions), meter.next_step())
    t0 = time.perf_counter()
    logits = runner.run_lanes(ids, positions, slots, owners, last)  # (B, vocab)
    tokens = _sample(streams, logits)
    run.question_s = time.perf_counter() - t0
    nxt = [s.take(tok) for s, tok in zip(streams, tokens)]
    advance(nxt.count(None))
    position = [start + len(q) for q in questions]
    while True:
        going = [b for b, tok in enumerate(nxt) if tok is not None]
        if not going:
            return run
        meter.next_step()
        t0 = time.perf_counter()
        k = len(going)
        pad = bucket(k) - k if runner.pads_lanes else 0  # copies of the first token, in no answer's lane
        logits = runner.run_lanes([nxt[b] for b in going] + [nxt[going[0]]] * pad,
                                  [position[b] for b in going] + [position[going[0]]] * pad,
                                  [lanes.take(b, 1)[0] for b in going] + lanes.pad_slots(pad), going + [PAD_LANE] * pad, real=k)
        tokens = _sample([streams[b] for b in going], logits[:k])  # waits for the step: it is timed whole
        run.stepped(going, tokens, nxt, position, time.perf_counter() - t0, advance)


def _sample(streams: list[TokenStream], logits: torch.Tensor) -> list[int]:
    """The next token of each stream from its row of ``logits: (B, vocab)``."""
    if all(s.sampling.temperature == 0.0 for s in streams):
        return logits.argmax(dim=-1).tolist()
    return [s.sample(row) for s, row in zip(streams, logits)]


def batch_stats(meter: ByteMeter, run: BatchRun, new_tokens: int) -> dict[str, Any]:
    """What the batch's steps read: per tier, the bytes its answers asked for (``logical``, their
    sum) and those moved (``physical``: the union of their rows, read once); the same per step,
    with the answers in it; times and aggregate throughput."""
    first = run.first_step
    steps = range(first, first + 1 + len(run.step_answers))
    per_step = []
    for s, answers in zip(steps, [len(run.queries), *run.step_answers]):
        c = meter.totals(step=s)
        per_step.append({"step": s - first, "answers": answers, "logical": c.logical, "physical": c.physical})
    by_tier = {}
    for t in meter.tiers(since=first):
        c = meter.totals(tier=t, since=first)
        by_tier[t] = {"logical": c.logical, "physical": c.physical, "h2d": c.h2d}
    total = meter.totals(since=first)
    seconds = run.question_s + run.decode_s
    return {
        "answers": len(run.queries), "queries": sum(run.queries), "decode_steps": len(run.step_answers),
        "bytes": {"logical": total.logical, "physical": total.physical, "by_tier": by_tier,
                  "index": meter.index_totals(since=first).bytes},
        "per_step": per_step,
        "timings_ms": {"question": 1e3 * run.question_s, "decode": 1e3 * run.decode_s,
                       "decode_per_step": 1e3 * run.decode_s / len(run.step_answers) if run.step_answers else None},
        "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds if seconds > 0 else None,
    }


@dataclass
class Member:
    """One document of a group step: its runner and cache, its prefill's last logits, its first
    position to decode."""

    runner: StepRunner
    cache: RCCache
    logits: torch.Tensor  # (1, vocab)
    start: int


def group_captures(members: list[Member]) -> bool:
    """Whether a group's decode steps run as CUDA graphs: every document's step runs on the
    device alone (as a single document's captured step does) and none reads the disk tier's
    block cache in place (its misses are filled between runs of a step, which a group's step,
    run once, cannot do)."""
    return all(m.runner.capture_lanes and m.runner.can_capture() and not m.runner.state.reads_blocks_in_place()
               for m in members)


def decode_group(model, tokenizer, eos: set[int], members: list[Member], sampling: SamplingConfig,  # noqa: ANN001
                 advance: Callable[[int], None] = _nothing) -> BatchRun:
    """Continue several prefilled documents together: each step is one forward over one token per
    document still going, each document's attention over its own state (:mod:`..hf.group`).  The
    documents' own meters count their reads, a step at a time (``first_step`` is unused: each
    answer's first step is its meter's step before the loop, plus one).

    Where the device allows (:func:`group_captures`), a step is a CUDA graph: one per set of
    documents still going and their plans (a document that stops, or a plan that changes, makes
    a new one; MAX_GRAPHS are kept)."""
    device = members[0].runner.state.device
    streams = [TokenStream(tokenizer, eos, sampling, device) for _ in members]
    group = GroupCache([m.cache for m in members])
    forward = group_forward(model, group)
    captured = group_captures(members)
    graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = OrderedDict()
    pool = torch.cuda.graph_pool_handle() if captured else None
    run = BatchRun(streams, [0] * len(members), [0] * len(members), 0)
    nxt = [s.take(tok) for s, tok in zip(streams, _sample(streams, torch.cat([m.logits for m in members])))]
    advance(nxt.count(None))
    position = [m.start for m in members]
    while True:
        going = [i for i, tok in enumerate(nxt) if tok is not None]
        if not going:
            return run
        t0 = time.perf_counter()
        inputs = []
        for i in going:
            runner = members[i].runner
            runner.state.meter.next_step()
            inputs.append(runner.begin([nxt[i]], position[i], captured=captured, deferrable=False))
        group.members = [members[i].cache for i in going]
        spans = [(j, j + 1) for j in range(len(going))]

        def step(going: list[int] = going, inputs: list = inputs, spans: list = spans) -> torch.Tensor:
            for i, x in zip(going, inputs):
                members[i].runner.prelude(x)
            ids = torch.cat([x.ids for x in inputs], dim=1)
            positions = torch.cat([x.positions for x in inputs], dim=1)
            return forward(ids, positions, spans)  # (k, vocab)

        if captured:
            key = tuple((i, members[i].runner.state.plan, id(x)) for i, x in zip(going, inputs))
            if key not in graphs:
                while len(graphs) >= MAX_GRAPHS:
                    graphs.popitem(last=False)
                graphs[key] = capture(step, pool)
                run.captures += 1
            graph, logits = graphs[key]
            graph.replay()
        else:
            logits = step()
        tokens = _sample([streams[i] for i in going], logits)
        for i in going:
            members[i].runner.end(1, position[i])
        run.stepped(going, tokens, nxt, position, time.perf_counter() - t0, advance)


def group_stats(answers: list[dict[str, Any]], run: BatchRun, new_tokens: int) -> dict[str, Any]:
    """A group of documents decoded together: its answers' bytes summed (each document reads its
    own), steps, times and aggregate throughput."""
    seconds = run.decode_s
    return {
        "answers": len(answers), "decode_steps": len(run.step_answers), "step_answers": run.step_answers,
        "graphs_captured": run.captures, "bytes": {"logical": sum(a["bytes"]["logical"] for a in answers), "physical": sum(a["bytes"]["physical"] for a in answers)},
        "timings_ms": {"decode": 1e3 * seconds,
                       "decode_per_step": 1e3 * seconds / len(run.step_answers) if run.step_answers else None,
                       "per_step": [1e3 * x for x in run.step_s]},
        "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds if seconds > 0 else None,
    }

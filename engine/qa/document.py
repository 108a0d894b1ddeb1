"""A prefilled document: ask it questions, score continuations, or continue its prompt.

Questions do not change a document: the question and answer tokens join the tail (no spill) and
are dropped afterwards.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from ...storage import Artifact, ByteMeter, CorruptChunkError, KVTier, StoreReplacedError
from ...storage.temporaries import Scratch
from ..decode.lanes import Lanes, bucket
from ..decode.runner import StepRunner
from ..config import EngineConfig
from ..hf.cache import RCCache
from ..hf.integration import rc_forward
from ..hf.loader import LoadedModel
from ..progress import progress
from ..rule.feature_maps import EstimatorSpec
from ..sampling import SamplingConfig
from .batch import batch_stats, decode_batch
from .generation import generate_tokens
from .inputs import sampling_config, several
from .stats import answer_stats


class DocumentEngine(Protocol):
    """What a document needs of the engine that made it (:class:`rcengine.Engine`)."""

    lm: LoadedModel
    config: EngineConfig
    show_progress: bool

    def check_length(self, prompt_tokens: int, new_tokens: int) -> None: ...

    def token_ids(self, value: object, what: str, special: bool = True) -> list[int]: ...

    def with_config(self, config: EngineConfig, verify_maps: bool) -> DocumentEngine:
        """An engine like this one (model, progress, log) with ``config``."""
        ...

# Tail slots kept free beyond a question's own tokens and answer (no reallocation for small ones).
QUESTION_HEADROOM = 64


@dataclass
class Answer:
    """Generated text and what it cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int  # tokens the answer was conditioned on (document + question)
    new_tokens: int
    stats: dict[str, Any] = field(default_factory=dict)


class Document:
    """A prefilled sequence, ready to be continued or questioned."""

    def __init__(self, engine: DocumentEngine, cache: RCCache, tokens: int, last_logits: torch.Tensor | None, prefill_ms: float,
                 store: str | None, scratch: Scratch | None, artifact: Artifact | None = None) -> None:
        self.engine = engine
        self.cache = cache
        self.tokens = tokens
        self.last_logits = last_logits
        self.prefill_ms = prefill_ms
        self.prefill_phases_ms: dict[str, float] = {}  # forward, finalize, flush, persist, commit: ..., reopen (Engine.prefill)
        self.prefill_writes: dict[str, float] = {}  # a prefill to disk: where its writes' time went (WriteStats)
        self.store = store
        self._artifact = artifact  # a reopened store: told apart from a store replaced while it is read
        # First: from here on the tier and scratch store are released with this object, however it ends.
        self._finalizer = weakref.finalize(self, _cleanup, cache.state.tier, scratch)
        self.runner = StepRunner(cache.state, rc_forward(engine.lm.model, cache), engine.config.graphs)

    @property
    def state(self):  # noqa: ANN201 (the KVState)
        return self.cache.state

    @property
    def meter(self) -> ByteMeter:
        return self.cache.state.meter

    def configure(self, method: str | None = None, budget: float | None = None, estimator: EstimatorSpec | None = None,
                  selector: str | None = None, select_block: int | None = None, fused: bool | None = None) -> None:
        """Change how the next questions attend to this document: the KV and anchors are reused.
        A new ``estimator`` or ``selector`` is built once from the tier (not metered) and kept."""
        self._check_open()
        changes = {k: v for k, v in {"method": method, "budget": budget, "estimator": estimator, "selector": selector,
                                     "select_block": select_block, "fused": fused}.items() if v is not None}
        new = replace(self.engine.config, **changes).resolved()  # validated by EngineConfig
        verify = estimator is not None and estimator != self.engine.config.estimator
        engine = self.engine.with_config(new, verify_maps=verify)
        self.state.configure(engine.config)
        self.engine = engine

    def drop_caches(self) -> None:
        """Forget cached KV blocks, so that the next question starts cold (disk tier; no-op otherwise)."""
        cache = getattr(self.state.tier, "cache", None)
        if cache is not None:
            cache.clear()

    @contextlib.contextmanager
    def _scratch_tail(self, tokens: int) -> Iterator[None]:
        """``tokens`` appended within this block join the tail without spilling, and are dropped after."""
        st = self.state
        st.tail.reserve(st.tail.n + tokens + QUESTION_HEADROOM)
        n, seen = st.tail.n, st.seen
        st.spill_enabled = False
        try:
            yield
        finally:
            st.tail.truncate(n)
            st.seen = seen
            st.spill_enabled = True

    def _tokens(self, text: str | list[int], what: str) -> list[int]:
        self._check_open()
        return self.engine.token_ids(text, what, special=False)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Reads of a reopened store that fail because the store was replaced while this document
        read it say so, instead of calling it damaged."""
        try:
            yield
        except CorruptChunkError as e:
            if self._artifact is not None and self._artifact.replaced():
                raise StoreReplacedError(f"{self.store} was replaced (prefilled again) while this document read it: open it "
                                         "again to read the new one") from e
            raise

    def ask(self, question: str | list[int], sampling: SamplingConfig | None = None, on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer one question about the document; the document is left as it was.  The question's
        tokens go through each layer in one batched step."""
        ids = self._tokens(question, "question")
        sampling = sampling_config(sampling)
        self.engine.check_length(self.tokens + len(ids), sampling.max_new_tokens)
        first_step = self.meter.next_step()
        lm = self.engine.lm
        with self._reading(), self._scratch_tail(len(ids) + sampling.max_new_tokens), torch.no_grad():
            t0 = time.perf_counter()
            logits = self.runner.run(ids, self.tokens)
            question_ms = 1e3 * (time.perf_counter() - t0)
            out = generate_tokens(self.runner, lm.tokenizer, lm.eos_token_ids, logits, self.tokens + len(ids), sampling,
                                  self.meter, on_text)
        stats = answer_stats(self.state, self.meter, first_step, len(ids) + out.steps, out.steps, self.prefill_ms,
                             question_ms, out.decode_s)
        return Answer(out.text, out.tokens, self.tokens + len(ids), len(out.tokens), stats)

    def ask_many(self, questions: Sequence[str | list[int]], sampling: SamplingConfig | None = None) -> list[Answer]:
        """Answer several questions about the document together -> their answers, in order.  Each
        question is asked of the document as :meth:`ask` would (the same tokens, greedy, within
        float tolerance), but every step serves all answers still going: the weights are read once
        per step for all of them, and the document's rows they select once for their union.  Each
        answer's ``stats`` holds its share of the batch's reads, and ``stats["batch"]`` the batch's
        (the same dict for all): per tier and per step, bytes asked for (summed over answers) and
        moved (their union)."""
        self._check_open()
        ids = [self._tokens(q, f"question {i + 1}") for i, q in enumerate(several(questions, "questions"))]
        sampling = sampling_config(sampling)
        for q in ids:
            self.engine.check_length(self.tokens + len(q), sampling.max_new_tokens)
        sizes = [len(q) + sampling.max_new_tokens for q in ids]
        pad = bucket(len(ids)) - 1 if self.runner.pads_lanes else 0  # slots of padding tokens (captured steps)
        lm = self.engine.lm
        show = self.engine.show_progress
        with self._reading(), self._scratch_tail(sum(sizes) + pad), torch.no_grad(), \
                progress("questions", len(ids), "answers", show) as advance:
            run = decode_batch(self.runner, lm.tokenizer, lm.eos_token_ids, self.meter, ids, self.tokens, sampling,
                               Lanes(self.state.tail, sizes, pad), advance)
        new_tokens = sum(len(s.tokens) for s in run.streams)
        batch = batch_stats(self.meter, run, new_tokens)
        total, decoding = sum(run.queries), sum(run.steps)
        answers = []
        for b, (q, stream, queries, steps) in enumerate(zip(ids, run.streams, run.queries, run.steps)):
            share = (queries / total, steps / decoding if decoding else 0.0)
            stats = answer_stats(self.state, self.meter, run.first_step, queries, steps, self.prefill_ms, 1e3 * run.question_s,
                                 run.decode_s_of(b), share)
            stats["batch"] = batch
            answers.append(Answer(stream.text, stream.tokens, self.tokens + len(q), len(stream.tokens), stats))
        return answers

    def logits(self, continuation: str | list[int]) -> torch.Tensor:
        """Teacher-forced next-token logits ``(T, vocab)`` float32 after each of the ``T`` tokens of
        ``continuation`` appended to the document (row t predicts token t + 1).  For scoring answers
        and measuring quality; the document is left as it was."""
        ids = self._tokens(continuation, "continuation")
        self.engine.check_length(self.tokens + len(ids), 0)
        self.meter.next_step()
        with self._reading(), self._scratch_tail(len(ids)), torch.no_grad():
            return self.runner.run(ids, self.tokens, every_position=True)[0]

    def continue_prompt(self, sampling: SamplingConfig | None = None, on_text: Callable[[str], None] | None = None) -> Answer:
        """Continue the prefilled prompt itself (what ``generate`` does); tail tokens spill."""
        self._check_open()
        if self.last_logits is None:
            raise ValueError("a reopened document has no pending prompt to continue: ask it a question instead")
        sampling = sampling_config(sampling)
        first_step = self.meter.step + 1
        lm = self.engine.lm
        with torch.no_grad():
            out = generate_tokens(self.runner, lm.tokenizer, lm.eos_token_ids, self.last_logits, self.tokens, sampling,
                                  self.meter, on_text)
        self.last_logits = None
        stats = answer_stats(self.state, self.meter, first_step, out.steps, out.steps, self.prefill_ms, 0.0, out.decode_s)
        return Answer(out.text, out.tokens, self.tokens, len(out.tokens), stats)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _check_open(self) -> None:
        if self.closed:
            where = f"reopen it with engine.open({self.store!r})" if self.store else "prefill it again"
            raise ValueError(f"this document is closed (its tier and scratch store are released): {where}")

    def close(self) -> None:
        """Release the tier (and remove a scratch store); the document answers nothing after."""
        runner = getattr(self, "runner", None)  # absent when __init__ was interrupted
        if runner is not None:
            runner.drop_graphs()
        self._finalizer()

    def __enter__(self) -> "Document":
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.close()


def _cleanup(tier: KVTier, scratch: Scratch | None) -> None:
    tier.close()
    if scratch is not None:
        scratch.remove()

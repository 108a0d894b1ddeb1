"""The token loop of an answer: sample, stream text, stop; one forward step per new token.

:class:`TokenStream` is one answer's side of it (its tokens, text, stop rules and seeded
generator); :func:`generate_tokens` runs one, and the batch loop in :mod:`.batch` runs several
through shared steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...storage import ByteMeter
from ..decode.runner import StepRunner
from ..sampling import SamplingConfig, sample_next, sampling_generator


@dataclass
class Generated:
    tokens: list[int]
    text: str
    decode_s: float  # time of the decode steps (forward and sampling)
    steps: int  # decode steps run (one per new token but the last, or all of them at EOS)


class TokenStream:
    """One answer's tokens and text as they are sampled: :meth:`sample` the next token from its
    logits and :meth:`take` it, until ``take`` says the answer is done."""

    def __init__(self, tokenizer, eos: set[int], sampling: SamplingConfig, device: torch.device,  # noqa: ANN001
                 on_text: Callable[[str], None] | None = None) -> None:
        self.tokenizer, self.eos, self.sampling, self.on_text = tokenizer, eos, sampling, on_text
        self.gen = sampling_generator(sampling, device)
        self.tokens: list[int] = []
        self.text = ""
        self.done = False
        self._emitted = 0

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from its ``logits: (vocab,)`` (waits for them)."""
        return sample_next(logits, self.sampling, self.gen)

    def take(self, token: int) -> int | None:
        """Add the next token -> it, to be fed to the next step, or None when the answer is done
        (end of sequence, which is not added; a stop string; ``max_new_tokens``)."""
        cfg = self.sampling
        if token in self.eos and not cfg.ignore_eos:
            return self._finish()
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in cfg.stop) if i >= 0), default=-1)
        self.text = text[:cut] if cut >= 0 else text
        if self.on_text is not None:
            safe = len(self.text) if cut >= 0 else safe_prefix(self.text, cfg.stop)
            if safe > self._emitted:
                self.on_text(self.text[self._emitted : safe])
                self._emitted = safe
        if cut >= 0 or len(self.tokens) >= cfg.max_new_tokens:
            return self._finish()
        return token

    def _finish(self) -> None:
        self.done = True
        if self.on_text is not None and len(self.text) > self._emitted:
            self.on_text(self.text[self._emitted :])
            self._emitted = len(self.text)
        return None


def generate_tokens(
    runner: StepRunner, tokenizer, eos: set[int], logits: torch.Tensor, position: int, sampling: SamplingConfig,  # noqa: ANN001
    meter: ByteMeter, on_text: Callable[[str], None] | None = None,
) -> Generated:
    """Continue from ``logits: (1, vocab)`` of the token before ``position``."""
    stream = TokenStream(tokenizer, eos, sampling, logits.device, on_text)
    decode_s, steps = 0.0, 0
    token = stream.take(stream.sample(logits[0]))
    while token is not None:
        meter.next_step()
        t0 = time.perf_counter()
        logits = runner.run([token], position)
        sampled = stream.sample(logits[0])  # waits for the step: it is timed whole
        decode_s += time.perf_counter() - t0
        token = stream.take(sampled)
        steps += 1
        position += 1
    return Generated(stream.tokens, stream.text, decode_s, steps)


def safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the prefix of ``text`` that no stop string can still claim."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold

"""The token loop of an answer: sample, stream text, stop; one forward step per new token."""

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


def generate_tokens(
    runner: StepRunner, tokenizer, eos: set[int], logits: torch.Tensor, position: int, sampling: SamplingConfig,  # noqa: ANN001
    meter: ByteMeter, on_text: Callable[[str], None] | None = None,
) -> Generated:
    """Continue from ``logits: (1, vocab)`` of the token before ``position``."""
    gen = sampling_generator(sampling, logits.device)
    out: list[int] = []
    text, emitted, decode_s, steps = "", 0, 0.0, 0
    token = sample_next(logits[0], sampling, gen)
    while True:
        if token in eos and not sampling.ignore_eos:
            break
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        if on_text is not None:
            safe = len(text) if cut >= 0 else safe_prefix(text, sampling.stop)
            if safe > emitted:
                on_text(text[emitted:safe])
                emitted = safe
        if cut >= 0 or len(out) >= sampling.max_new_tokens:
            break
        meter.next_step()
        t0 = time.perf_counter()
        logits = runner.run([token], position)
        token = sample_next(logits[0], sampling, gen)  # waits for the step: it is timed whole
        decode_s += time.perf_counter() - t0
        steps += 1
        position += 1
    if on_text is not None and len(text) > emitted:
        on_text(text[emitted:])
    return Generated(out, text, decode_s, steps)


def safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the prefix of ``text`` that no stop string can still claim."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold

"""Choosing the next token on the compute device: greedy, temperature, top-p; seeded."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """``temperature`` 0 is greedy.  Generation stops at an end-of-sequence token (unless
    ``ignore_eos``: for timing a fixed number of steps), at any of the ``stop`` strings (which are
    cut from the text), or after ``max_new_tokens``."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 1 << 63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r:.40}")
        if isinstance(self.stop, str) or not all(isinstance(x, str) and x for x in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r:.60}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def sampling_generator(cfg: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """The seeded generator of one answer, on the device that samples (None: unseeded)."""
    return torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    """``logits: (vocab,)`` float32 on the compute device -> a token id (the one value that crosses
    to the host)."""
    if cfg.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < cfg.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order, torch.where(keep, sorted_p, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))

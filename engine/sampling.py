"""Choosing the next token on the compute device: greedy, temperature, top-p; seeded."""

from __future__ import annotations

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
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


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

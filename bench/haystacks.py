"""What needles hide in: RULER's noise sentences, or consecutive natural-text documents (the
shipped eval split's, by default)."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

# RULER's noise haystack (niah.py, type_haystack="noise"): these sentences, repeated.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def noise_haystack(rng: random.Random, n_chars: int) -> str:
    return (NOISE * (n_chars // len(NOISE) + 1))[:n_chars]


def corpus_haystack(documents: Sequence[str]) -> Callable[[random.Random, int], str]:
    """A haystack source over natural-text documents: consecutive documents from a random start."""
    if not documents:
        raise ValueError("a haystack needs at least one document")

    def haystack(rng: random.Random, n_chars: int) -> str:
        i = rng.randrange(len(documents))
        parts, size = [], 0
        while size < n_chars:
            doc = documents[i % len(documents)].replace("\n", " ")
            parts.append(doc)
            size += len(doc) + 1
            i += 1
        return " ".join(parts)[:n_chars]

    return haystack


EVAL_HAYSTACK = Path(__file__).resolve().parent / "data" / "eval_haystack.jsonl.gz"


def eval_documents() -> list[str]:
    """The shipped eval-split text: held-out Python documentation the default model never saw
    (about 65K tokens; made by ``train/export_eval_haystack.py``)."""
    with gzip.open(EVAL_HAYSTACK, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

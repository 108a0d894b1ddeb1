"""RULER-style long-document tasks, generated deterministically from a seed.

Tasks: single needle (number and word values), multi-key, multi-value and multi-query needles,
variable tracking (multi-hop assignment chains), common-words and frequent-words extraction (these
need diffuse, high-entropy attention), and fact lookup over distractor documents.  Needles use
RULER's phrasing; scoring uses RULER's string-match rules.

Splits ``train`` / ``dev`` / ``eval`` are disjoint in their key words (made-up words, assigned to a
split by a hash) and in their haystack text (the caller gives each split its own documents).

A context is built to a target length in tokens of the given tokenizer; the needle's depth (0 =
start, 1 = end) is recorded.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "dev", "eval")
TASKS = (
    "niah_single_number", "niah_single_word", "niah_multikey", "niah_multivalue", "niah_multiquery",
    "variable_tracking", "common_words", "frequent_words", "qa_facts",
)
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["ar", "en", "ol", "um", "is"]


@dataclass(frozen=True, slots=True)
class TaskExample:
    task: str
    split: str
    context: str
    question: str  # asked after the context; ends with RULER's answer prefix
    answers: tuple[str, ...]
    depth: float | None  # where the (first) needle sits in the context, 0..1
    seed: int

    @property
    def prompt(self) -> str:
        return self.context + self.question


def split_of(word: str) -> str:
    """Which split a made-up key word belongs to (about 80 / 10 / 10 %)."""
    h = int(hashlib.sha256(word.encode()).hexdigest(), 16) % 10
    return "train" if h < 8 else ("dev" if h == 8 else "eval")


def make_word(rng: random.Random, split: str, syllables: int = 3) -> str:
    """A made-up word of ``split`` (rejection-sampled on its hash)."""
    while True:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(syllables))
        if split_of(word) == split:
            return word


def score(prediction: str, answers: Sequence[str], task: str) -> float:
    """RULER's rules: the fraction of answers found in the prediction (``string_match_all``);
    for QA, 1 if any answer is found (``string_match_part``).  Case-insensitive."""
    pred = prediction.lower()
    found = [a.lower() in pred for a in answers]
    if task.startswith("qa"):
        return float(any(found))
    return sum(found) / len(answers)


class TaskGenerator:
    """Builds examples of a split.  ``haystack(rng, n_chars) -> str`` returns natural text of the
    split; ``count_tokens(text) -> int`` measures lengths."""

    def __init__(self, split: str, haystack: Callable[[random.Random, int], str], count_tokens: Callable[[str], int]) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is unknown: use one of {', '.join(SPLITS)}")
        self.split = split
        self.haystack = haystack
        self.count_tokens = count_tokens

    def example(self, task: str, length: int, seed: int, depth: float | None = None) -> TaskExample:
        """An example of about ``length`` tokens (context + question)."""
        if task not in TASKS:
            raise ValueError(f"task {task!r} is unknown: use one of {', '.join(TASKS)}")
        rng = random.Random(f"{self.split}/{task}/{length}/{seed}")
        build = getattr(self, "_" + task)
        return build(rng, length, seed, depth)

    # -- context assembly ---------------------------------------------------------------------

    def _fill(self, rng: random.Random, length: int, inserts: list[str], question: str, depths: list[float]) -> tuple[str, float]:
        """Haystack of ``length`` tokens minus the question and inserts, with the inserts placed at
        sentence boundaries at the given depths.  Returns (context, depth of the first insert)."""
        budget = length - self.count_tokens(question) - sum(self.count_tokens(s) for s in inserts) - 8
        text = self.haystack(rng, max(budget, 1) * 8)  # more than enough: tokens are < 8 characters
        for _ in range(3):  # trim to the token budget by proportion, refining
            n = self.count_tokens(text)
            if n <= budget:
                break
            text = text[: max(0, int(len(text) * budget / n * 0.995))]
        cuts = []
        for d in depths:
            pos = int(len(text) * d)
            dot = text.rfind(". ", 0, pos)
            cuts.append(dot + 2 if dot >= 0 else 0)
        order = sorted(range(len(inserts)), key=lambda i: cuts[i])
        out, prev = [], 0
        for i in order:
            out.append(text[prev : cuts[i]])
            out.append(inserts[i] + " ")
            prev = cuts[i]
        out.append(text[prev:])
        context = "".join(out).rstrip() + "\n\n"
        first = cuts[0] / max(len(text), 1)
        return context, first

    def _depths(self, rng: random.Random, k: int, depth: float | None) -> list[float]:
        first = rng.random() if depth is None else depth
        return [first] + [rng.random() for _ in range(k - 1)]

    # -- tasks --------------------------------------------------------------------------------

    def _number(self, rng: random.Random) -> str:
        return str(rng.randint(1_000_000, 9_999_999))

    def _needles(self, rng, length, seed, depth, task, kind="number", keys=1, values=1, asked=1):  # noqa: ANN001, ANN202
        names = []
        while len(names) < keys:
            w = make_word(rng, self.split)
            if w not in names:
                names.append(w)
        table = {k: [self._number(rng) if kind == "number" else make_word(rng, self.split, 2) for _ in range(values)] for k in names}
        inserts = [f"One of the special magic {kind}s for {k} is: {v}." for k in names for v in table[k]]
        rng.shuffle(inserts)
        ask = names[:asked]
        if asked > 1:
            q_keys = ", ".join(ask[:-1]) + f" and {ask[-1]}"
            question = (f"What are all the special magic {kind}s for {q_keys} mentioned in the provided text?\n"
                        f"Answer: The special magic {kind}s for {q_keys} mentioned in the provided text are")
        elif values > 1:
            question = (f"What are all the special magic {kind}s for {ask[0]} mentioned in the provided text?\n"
                        f"Answer: The special magic {kind}s for {ask[0]} mentioned in the provided text are")
        else:
            question = (f"What is the special magic {kind} for {ask[0]} mentioned in the provided text?\n"
                        f"Answer: The special magic {kind} for {ask[0]} mentioned in the provided text is")
        # The first insert is one of the asked key's needles (its depth is the one recorded).
        first = next(i for i, s in enumerate(inserts) if f" for {ask[0]} is:" in s)
        inserts.insert(0, inserts.pop(first))
        context, d = self._fill(rng, length, inserts, question, self._depths(rng, len(inserts), depth))
        answers = tuple(v for k in ask for v in table[k])
        return TaskExample(task, self.split, context, "\n" + question, answers, d, seed)

    def _niah_single_number(self, rng, length, seed, depth):  # noqa: ANN001, ANN202
        return self._needles(rng, length, seed, depth, "niah_single_number")

    def _niah_single_word(self, rng, length, seed, depth):  # noqa: ANN001, ANN202
        return self._needles(rng, length, seed, depth, "niah_single_word", kind="word")

    def _niah_multikey(self, rng, length, seed, depth):  # noqa: ANN001, ANN202
        return self._needles(rng, length, seed, depth, "niah_multikey", keys=4)

    def _niah_multivalue(self, rng, length, seed, depth):  # noqa: ANN001, ANN202
        return self._needles(rng, length, seed, depth, "niah_multivalue", values=4)

    def _niah_multiquery(self, rng, length, seed, depth):  # noqa: ANN001, ANN202
        return self._needles(rng, length, seed, depth, "niah_multiquery", keys=4, asked=2)

    def _variable_tracking(self, rng, length, seed, depth):  # noqa: ANN001, ANN202
        value = str(rng.randint(10_000, 99_999))
        names = []
        while len(names) < 5:
            w = make_word(rng, self.split, 2).upper()
            if w not in names:
                names.append(w)
        inserts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        question = (f"Find all variables that are assigned the value {value} in the text above.\n"
                    f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned the value {value}, they are:")
        depths = sorted(self._depths(rng, 5, depth))
        context, d = self._fill(rng, length, inserts, question, depths)
        return TaskExample("variable_tracking", self.split, context, "\n" + question, tuple(names), d, seed)

    def _common_words(self, rng, length, seed, depth):  # noqa: ANN001, ANN202
        """A numbered word list: 10 words appear 30 times each, the rest 3 times (RULER's cwe)."""
        common = [make_word(rng, self.split, 2) for _ in range(10)]
        question = ("What are the 10 most common words in the above list?\n"
                    "Answer: The top 10 words that appear most often in the list are:")
        words = [w for w in common for _ in range(30)]
        budget = length - self.count_tokens(question) - 8
        numbered = lambda ws: " ".join(f"{i + 1}. {w}" for i, w in enumerate(ws))  # noqa: E731
        while self.count_tokens(numbered(words)) < budget:
            for _ in range(10):
                rare = make_word(rng, self.split, 2)
                if rare not in common:
                    words += [rare] * 3
        rng.shuffle(words)
        while words and self.count_tokens(numbered(words)) > budget:
            words = [w for w in words[:-12]] if len(words) > 300 else words[:-1]
        context = numbered(words) + "\n\n"
        return TaskExample("common_words", self.split, context, "\n" + question, tuple(common), None, seed)

    def _frequent_words(self, rng, length, seed, depth):  # noqa: ANN001, ANN202
        """Coded words with Zipf-like frequencies among noise (RULER's fwe): find the 3 most frequent."""
        vocab = [make_word(rng, self.split, 2) for _ in range(200)]
        question = ("What are the 3 most frequently appeared coded words in the above coded text?\n"
                    "Answer: According to the coded text above, the three most frequently appeared words are:")
        budget = length - self.count_tokens(question) - 8
        weights = [1.0 / (r + 1) ** 1.2 for r in range(len(vocab))]
        words: list[str] = []
        while True:
            words += rng.choices(vocab, weights, k=200)
            if self.count_tokens(" ".join(words)) * 1.1 >= budget:
                break
        context = "... " + " ".join(words) + " ...\n\n"
        counts = {w: words.count(w) for w in set(words)}
        top = tuple(sorted(counts, key=lambda w: -counts[w])[:3])
        return TaskExample("frequent_words", self.split, context, "\n" + question, top, None, seed)

    def _qa_facts(self, rng, length, seed, depth):  # noqa: ANN001, ANN202
        """Short fact documents among distractor documents; one question about one fact."""
        facts = []
        for _ in range(8):
            place, city = make_word(rng, self.split).capitalize(), make_word(rng, self.split).capitalize()
            facts.append((place, city))
        inserts = [f"Document {i + 1}: The capital of {p} is the city of {c}." for i, (p, c) in enumerate(facts)]
        place, city = facts[0]
        question = f"Answer the question based on the given documents. Question: Which city is the capital of {place}?\nAnswer:"
        context, d = self._fill(rng, length, inserts, question, self._depths(rng, len(inserts), depth))
        return TaskExample("qa_facts", self.split, context, "\n" + question, (city,), d, seed)


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

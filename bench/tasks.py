"""RULER-style long-document tasks, generated deterministically from a seed.

Tasks: single needle (number and word values), multi-key, multi-value and multi-query needles,
variable tracking (multi-hop assignment chains), common-words and frequent-words extraction (these
need diffuse, high-entropy attention), and fact lookup over distractor documents.  Needles use
RULER's phrasing; scoring uses RULER's string-match rules.

Splits ``train`` / ``dev`` / ``eval`` are disjoint in their key words (made-up words, assigned to a
split by a hash) and in their haystack text (the caller gives each split its own documents).

A context is built to a target length in tokens of the given tokenizer; the needle's depth (0 =
start, 1 = end) is recorded.

Variety (``TaskGenerator(..., variety=...)``; without it every example has RULER's phrasing, made-up
word keys and the caller's haystack, as the default model was trained and measured): each example
draws a needle phrasing (:data:`PHRASINGS`: RULER's own and paraphrases of it), key and value
shapes (made-up words, hyphenated word pairs, 7-digit numbers, uuids), a haystack source (the
caller's text, RULER's repeated noise sentences, numbered lists, or generated records) and, for
variable tracking, 1-2 chains of 2-5 hops.  :data:`TRAIN_VARIETY` and :data:`EVAL_VARIETY` share
their phrasings and sources (the eval split differs in its key words and text);
:data:`HELDOUT_VARIETY` has phrasings and a haystack source that training never sees.  The draw is
recorded on the example (``TaskExample.case``), so that accuracy can be reported per case.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .haystacks import noise_haystack
from .phrasings import PHRASINGS, Phrasing  # noqa: F401 (Phrasing: part of this module's interface)

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
    case: dict[str, str] = field(default_factory=dict)  # what a variety drew: phrasing, key, value, haystack, ...

    @property
    def prompt(self) -> str:
        return self.context + self.question


KEY_SHAPES = ("word", "pair", "number", "uuid")
VALUE_SHAPES = ("number", "word", "uuid")


@dataclass(frozen=True, slots=True)
class Variety:
    """What the examples of a generator draw from (uniformly).  ``haystacks`` name the sources:
    ``text`` (the caller's), ``noise``, ``list`` and ``records`` (built in)."""

    phrasings: tuple[str, ...]
    keys: tuple[str, ...] = KEY_SHAPES
    values: tuple[str, ...] = VALUE_SHAPES
    haystacks: tuple[str, ...] = ("text", "noise", "list")
    vt_chains: tuple[int, int] = (1, 2)
    vt_hops: tuple[int, int] = (2, 5)

    def __post_init__(self) -> None:
        unknown = [p for p in self.phrasings if p not in PHRASINGS] + [k for k in self.keys if k not in KEY_SHAPES] + [
            v for v in self.values if v not in VALUE_SHAPES] + [h for h in self.haystacks if h not in HAYSTACKS]
        if unknown or not (self.phrasings and self.keys and self.values and self.haystacks):
            raise ValueError(f"a variety needs phrasings, key and value shapes and haystacks from the known ones; unknown: {unknown}")


HAYSTACKS = ("text", "noise", "list", "records")
TRAIN_PHRASINGS = ("ruler", "ruler-plain", "remember", "record", "arrow")
HELDOUT_PHRASINGS = ("hidden", "passkey", "colon")
TRAIN_VARIETY = Variety(TRAIN_PHRASINGS)
EVAL_VARIETY = Variety(TRAIN_PHRASINGS)
# Phrasings, and a haystack source (generated records), that training never sees.
HELDOUT_VARIETY = Variety(HELDOUT_PHRASINGS, haystacks=("text", "records"))


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

    def __init__(self, split: str, haystack: Callable[[random.Random, int], str], count_tokens: Callable[[str], int],
                 variety: Variety | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is unknown: use one of {', '.join(SPLITS)}")
        self.split = split
        self.text_haystack = haystack
        self.haystack = haystack
        self.count_tokens = count_tokens
        self.variety = variety

    def example(self, task: str, length: int, seed: int, depth: float | None = None) -> TaskExample:
        """An example of about ``length`` tokens (context + question)."""
        if task not in TASKS:
            raise ValueError(f"task {task!r} is unknown: use one of {', '.join(TASKS)}")
        rng = random.Random(f"{self.split}/{task}/{length}/{seed}")
        build = getattr(self, "_" + task)
        self._case = {}
        self.haystack = self.text_haystack
        if self.variety is not None and task not in ("common_words", "frequent_words"):
            source = rng.choice(self.variety.haystacks)
            self._case["haystack"] = source
            self.haystack = {"text": self.text_haystack, "noise": noise_haystack, "list": self._list_haystack,
                             "records": self._records_haystack}[source]
        ex = build(rng, length, seed, depth)
        return TaskExample(ex.task, ex.split, ex.context, ex.question, ex.answers, ex.depth, ex.seed, dict(self._case))

    # -- built-in haystack sources (variety) ----------------------------------------------------

    def _list_haystack(self, rng: random.Random, n_chars: int) -> str:
        """A numbered stock list: items, colours and counts (English words only, so that no made-up
        key or value can occur in it)."""
        parts, size, i = [], 0, rng.randrange(1, 500)
        while size < n_chars:
            line = f"{i}. {rng.choice(_ITEMS)} {rng.choice(_ITEMS)}, {rng.choice(_COLOURS)}, {rng.randint(1, 999)} in stock. "
            parts.append(line)
            size += len(line)
            i += 1
        return "".join(parts)[:n_chars]

    def _records_haystack(self, rng: random.Random, n_chars: int) -> str:
        """Generated records of made-up towns (the held-out source: never in training)."""
        months = ("January", "March", "May", "July", "September", "November")
        parts, size = [], 0
        while size < n_chars:
            town = rng.choice(_TOWN_HEADS) + rng.choice(_TOWN_TAILS)
            line = (f"Record {rng.randint(1000, 99999)}: the town of {town} was founded in {rng.choice(months)} "
                    f"{rng.randint(1100, 1999)} and has {rng.randint(200, 90000):,} inhabitants. ")
            parts.append(line)
            size += len(line)
        return "".join(parts)[:n_chars]

    # -- context assembly ---------------------------------------------------------------------

    def _fill(self, rng: random.Random, length: int, inserts: list[str], question: str, depths: list[float]) -> tuple[str, float]:
        """Haystack of ``length`` tokens minus the question and inserts, with the inserts placed at
        sentence boundaries at the given depths.  Returns (context, depth of the first insert)."""
        budget = length - self.count_tokens(question) - sum(self.count_tokens(s) for s in inserts) - 8
        text = self.haystack(rng, max(budget, 1) * 8)  # more than enough: tokens are < 8 characters
        for _ in range(3):  # trim to the token budget by proportion, refining
            n = self.count_tokens(text)
            if n <= budget or n == 0:  # (no room at all: the inserts alone exceed the length)
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

    def _shaped(self, rng: random.Random, shape: str) -> str:
        """A key or value of ``shape``: a made-up word, a hyphenated pair of them, a 7-digit
        number or a uuid."""
        if shape == "word":
            return make_word(rng, self.split)
        if shape == "pair":
            return f"{make_word(rng, self.split, 2)}-{make_word(rng, self.split, 2)}"
        if shape == "number":
            return self._number(rng)
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def _needles(self, rng, length, seed, depth, task, kind="number", keys=1, values=1, asked=1):  # noqa: ANN001, ANN202
        phrasing, key_shape, value_shape = PHRASINGS["ruler"], "word", kind
        if self.variety is not None:
            name, key_shape = rng.choice(self.variety.phrasings), rng.choice(self.variety.keys)
            value_shape = kind if task == "niah_single_word" else rng.choice(self.variety.values)
            phrasing = PHRASINGS[name]
            self._case.update(phrasing=name, key=key_shape, value=value_shape)
        kind = value_shape
        names = []
        while len(names) < keys:
            w = self._shaped(rng, key_shape)
            if w not in names:
                names.append(w)
        table = {k: [] for k in names}
        taken = set(names)
        for k in names:
            while len(table[k]) < values:
                v = self._number(rng) if kind == "number" and self.variety is None else (
                    make_word(rng, self.split, 2) if kind == "word" else self._shaped(rng, kind))
                if v not in taken:  # every value (and key) appears once
                    table[k].append(v)
                    taken.add(v)
        slots = {"kind": kind, "kinds": kind + "s"}
        inserts = [(k, phrasing.needle.format(key=k, value=v, **slots)) for k in names for v in table[k]]
        rng.shuffle(inserts)
        ask = names[:asked]
        if asked > 1 or values > 1:
            q_keys = ", ".join(ask[:-1]) + f" and {ask[-1]}" if asked > 1 else ask[0]
            question = phrasing.ask_all.format(keys=q_keys, **slots)
        else:
            question = phrasing.ask_one.format(key=ask[0], **slots)
        # The first insert is one of the asked key's needles (its depth is the one recorded).
        first = next(i for i, (k, _) in enumerate(inserts) if k == ask[0])
        inserts.insert(0, inserts.pop(first))
        inserts = [text for _, text in inserts]
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
        """RULER's vt: ``VAR X = value`` then hops ``VAR Y = VAR X``; 1 chain of 4 hops (5
        variables), or with a variety 1-2 chains (the others distractors with their own values) of
        2-5 hops.  The answer: every variable of the first chain."""
        chains, hops = 1, 4
        if self.variety is not None:
            chains, hops = rng.randint(*self.variety.vt_chains), rng.randint(*self.variety.vt_hops)
            self._case.update(chains=str(chains), hops=str(hops))
        values, names = [], []
        while len(values) < chains:
            v = str(rng.randint(10_000, 99_999))
            if v not in values:
                values.append(v)
        while len(names) < chains * (hops + 1):
            w = make_word(rng, self.split, 2).upper()
            if w not in names:
                names.append(w)
        groups = [names[c * (hops + 1) : (c + 1) * (hops + 1)] for c in range(chains)]
        per_chain = [[f"VAR {g[0]} = {v}."] + [f"VAR {g[i]} = VAR {g[i - 1]}." for i in range(1, hops + 1)] for g, v in zip(groups, values, strict=True)]
        value, n = values[0], hops + 1
        question = (f"Find all variables that are assigned the value {value} in the text above.\n"
                    f"Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assigned the value {value}, they are:")
        # Each chain in order of depth; the chains interleave.
        depths = [sorted(self._depths(rng, n, depth if c == 0 else None)) for c in range(chains)]
        inserts = [s for chain in per_chain for s in chain]
        context, d = self._fill(rng, length, inserts, question, [x for ds in depths for x in ds])
        return TaskExample("variable_tracking", self.split, context, "\n" + question, tuple(groups[0]), d, seed)

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


_ITEMS = ("anchor", "basket", "candle", "drawer", "engine", "feather", "garden", "helmet", "ink", "jacket", "kettle", "ladder",
          "mirror", "needle", "orchard", "pencil", "quilt", "ribbon", "saddle", "tunnel", "umbrella", "violin", "wagon", "yarn")
_COLOURS = ("red", "green", "blue", "grey", "amber", "white", "black", "violet")
_TOWN_HEADS = ("Ash", "Brook", "Clay", "Elm", "Fair", "Green", "High", "Mill", "North", "Oak", "Red", "Stone", "West", "Wood")
_TOWN_TAILS = ("bridge", "bury", "field", "ford", "gate", "ham", "haven", "ley", "mouth", "stead", "ton", "wick")

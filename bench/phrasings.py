"""How a needle is said and asked for: RULER's own phrasing, four more for training, three held out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Phrasing:
    """A needle sentence and its questions.  ``{kind}``: number, word or uuid (``{kinds}`` its
    plural); ``{key}`` / ``{keys}``; ``{value}``.  ``ask_one`` asks for one value of one key,
    ``ask_all`` for every value of ``{keys}``; each ends with its answer prefix."""

    needle: str
    ask_one: str
    ask_all: str


PHRASINGS = {
    "ruler": Phrasing(  # RULER's own (niah.py)
        "One of the special magic {kinds} for {key} is: {value}.",
        "What is the special magic {kind} for {key} mentioned in the provided text?\n"
        "Answer: The special magic {kind} for {key} mentioned in the provided text is",
        "What are all the special magic {kinds} for {keys} mentioned in the provided text?\n"
        "Answer: The special magic {kinds} for {keys} mentioned in the provided text are"),
    "ruler-plain": Phrasing(
        "A special magic {kind} for {key} is {value}.",
        "What is the special magic {kind} for {key}?\nAnswer: The special magic {kind} for {key} is",
        "What are the special magic {kinds} for {keys}?\nAnswer: The special magic {kinds} for {keys} are"),
    "remember": Phrasing(
        "Remember this: the {kind} that goes with {key} is {value}.",
        "Which {kind} goes with {key}?\nAnswer: The {kind} that goes with {key} is",
        "Which {kinds} go with {keys}?\nAnswer: The {kinds} that go with {keys} are"),
    "record": Phrasing(
        "Note for {key}: its secret {kind} is {value}.",
        "What is the secret {kind} of {key}?\nAnswer: The secret {kind} of {key} is",
        "What are the secret {kinds} of {keys}?\nAnswer: The secret {kinds} of {keys} are"),
    "arrow": Phrasing(
        "[{key} -> {value}]",
        "In the text above, which {kind} does {key} point to?\nAnswer: {key} points to",
        "In the text above, which {kinds} do {keys} point to?\nAnswer: {keys} point to"),
    # held out: never in training
    "hidden": Phrasing(
        "Hidden in this text, the {kind} for {key} is {value}.",
        "Find the {kind} hidden for {key}.\nAnswer: The hidden {kind} for {key} is",
        "Find every {kind} hidden for {keys}.\nAnswer: The hidden {kinds} for {keys} are"),
    "passkey": Phrasing(
        "The pass {kind} of {key} is {value}. Keep it safe.",
        "What is the pass {kind} of {key}?\nAnswer: The pass {kind} of {key} is",
        "What are the pass {kinds} of {keys}?\nAnswer: The pass {kinds} of {keys} are"),
    "colon": Phrasing(
        "{key}: {value} (a {kind} to recall later)",
        "Recall the {kind} listed for {key}.\nAnswer: The {kind} listed for {key} is",
        "Recall the {kinds} listed for {keys}.\nAnswer: The {kinds} listed for {keys} are"),
}

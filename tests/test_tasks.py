"""The task suite: deterministic, disjoint splits, lengths on target, RULER scoring."""

from __future__ import annotations

import random

import pytest

from rcengine.bench.tasks import SPLITS, TASKS, TaskGenerator, corpus_haystack, make_word, score, split_of

TEXT = [
    "Rivers run to the sea, and the sea is never full. The wind goes toward the south, and turns about unto the north. " * 40,
    "A dictionary lists the words of a language with their meanings. Each entry begins with the word itself. " * 40,
]


def count(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_deterministic_and_answerable(task):
    gen = TaskGenerator("eval", corpus_haystack(TEXT), count)
    a, b = gen.example(task, 1500, seed=3), gen.example(task, 1500, seed=3)
    assert a == b
    assert a != gen.example(task, 1500, seed=4)
    assert a.answers and all(ans in a.context for ans in a.answers)
    assert 0.8 * 1500 <= count(a.prompt) <= 1.05 * 1500, count(a.prompt)
    assert score(" ".join(a.answers), a.answers, task) == 1.0


def test_needle_phrasing_and_depth():
    gen = TaskGenerator("dev", corpus_haystack(TEXT), count)
    ex = gen.example("niah_single_number", 2000, seed=1, depth=0.5)
    key = ex.question.split(" for ")[1].split(" mentioned")[0]
    assert f"One of the special magic numbers for {key} is: {ex.answers[0]}." in ex.context
    assert ex.question.strip().startswith(f"What is the special magic number for {key} mentioned in the provided text?")
    assert abs(ex.depth - 0.5) < 0.05
    position = ex.context.index(ex.answers[0]) / len(ex.context)
    assert abs(position - 0.5) < 0.05


def test_splits_use_disjoint_key_words():
    rng = random.Random(0)
    words = {split: {make_word(rng, split) for _ in range(300)} for split in SPLITS}
    assert not words["train"] & words["dev"] and not words["train"] & words["eval"] and not words["dev"] & words["eval"]
    assert all(split_of(w) == s for s, ws in words.items() for w in ws)
    for split in SPLITS:
        ex = TaskGenerator(split, corpus_haystack(TEXT), count).example("niah_multikey", 1000, seed=2)
        keys = [part.split(" is:")[0] for part in ex.context.split("special magic numbers for ")[1:]]
        assert keys and all(split_of(k) == split for k in keys)


def test_ruler_scoring_rules():
    assert score("The number is 1234567.", ["1234567"], "niah_single_number") == 1.0
    assert score("1234567 and 7654321", ["1234567", "7654321", "1111111", "2222222"], "niah_multivalue") == 0.5
    assert score("It is KASIMIR", ["Kasimir"], "qa_facts") == 1.0
    assert score("nothing", ["Kasimir", "Veldora"], "qa_facts") == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        TaskGenerator("test", corpus_haystack(TEXT), count)
    with pytest.raises(ValueError, match="task"):
        TaskGenerator("eval", corpus_haystack(TEXT), count).example("summarise", 100, 0)
    with pytest.raises(ValueError, match="haystack"):
        corpus_haystack([])

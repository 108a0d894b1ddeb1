"""The task suite: deterministic, disjoint splits, lengths on target, RULER scoring."""

from __future__ import annotations

import random

import pytest

from rcengine.bench.haystacks import corpus_haystack

from rcengine.bench.tasks import SPLITS, TASKS, TaskGenerator, make_word, score, split_of

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


NEEDLES = ("niah_single_number", "niah_single_word", "niah_multikey", "niah_multivalue", "niah_multiquery")
SHAPES = {
    "word": r"[a-z]+", "pair": r"[a-z]+-[a-z]+", "number": r"\d{7}",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
}


@pytest.mark.parametrize("variety", ["train", "eval", "heldout"])
@pytest.mark.parametrize("task", NEEDLES)
def test_varied_needles_are_answerable_and_shaped(variety, task):
    """With a variety, each needle example draws a phrasing, key and value shapes and a haystack
    source from it: the question is its phrasing's, each answer sits in the context in its needle,
    and keys and values have their shapes."""
    import re

    from rcengine.bench.tasks import EVAL_VARIETY, HELDOUT_VARIETY, PHRASINGS, TRAIN_VARIETY

    chosen = {"train": TRAIN_VARIETY, "eval": EVAL_VARIETY, "heldout": HELDOUT_VARIETY}[variety]
    gen = TaskGenerator("train" if variety == "train" else "eval", corpus_haystack(TEXT), count, variety=chosen)
    seen = set()
    for seed in range(24):
        ex = gen.example(task, 1200, seed)
        case = ex.case
        assert case["phrasing"] in chosen.phrasings and case["haystack"] in chosen.haystacks and case["key"] in chosen.keys
        seen.add((case["phrasing"], case["key"], case["value"], case["haystack"]))
        assert gen.example(task, 1200, seed) == ex
        phrasing = PHRASINGS[case["phrasing"]]
        answer_prefix = (phrasing.ask_all if "multi" in task and task != "niah_multikey" else phrasing.ask_one).split("\n")[1]
        head = answer_prefix.split("{")[0]
        assert ex.question.split("\n")[2].startswith(head)
        kind = case["value"]
        for value in ex.answers:
            assert re.fullmatch(SHAPES["word" if kind == "word" else kind], value), (kind, value)
            needle_re = re.escape(phrasing.needle).replace(r"\{key\}", r"(?P<key>[^\s\[\]:]+)").replace(r"\{value\}", re.escape(value))
            needle_re = needle_re.replace(r"\{kind\}", kind).replace(r"\{kinds\}", kind + "s")
            found = re.search(needle_re, ex.context)
            assert found, (case, value)
            assert re.fullmatch(SHAPES[case["key"]], found.group("key")), (case, found.group("key"))
            assert ex.context.count(value) == 1
        assert 0.8 * 1200 <= count(ex.prompt) <= 1.05 * 1200
    assert len(seen) > 12  # the draws vary


def test_heldout_phrasings_and_source_are_never_trained():
    from rcengine.bench.tasks import HELDOUT_VARIETY, PHRASINGS, TRAIN_VARIETY, Variety

    assert not set(HELDOUT_VARIETY.phrasings) & set(TRAIN_VARIETY.phrasings)
    assert set(HELDOUT_VARIETY.haystacks) - set(TRAIN_VARIETY.haystacks) == {"records"}
    gen = TaskGenerator("train", corpus_haystack(TEXT), count, variety=TRAIN_VARIETY)
    heldout_starts = [PHRASINGS[p].needle.split("{")[0] for p in HELDOUT_VARIETY.phrasings]
    for seed in range(30):
        ex = gen.example("niah_multikey", 800, seed)
        assert not any(start and start in ex.context for start in heldout_starts)
        assert "Record " not in ex.context
    with pytest.raises(ValueError, match="unknown"):
        Variety(("ruler", "made-up"))


@pytest.mark.parametrize("seed", range(12))
def test_varied_variable_tracking_answers_follow_the_chains(seed):
    """1-2 chains of 2-5 hops: following the assignments in the context from the asked value
    reaches exactly the answer's variables."""
    import re

    from rcengine.bench.tasks import TRAIN_VARIETY

    ex = TaskGenerator("train", corpus_haystack(TEXT), count, variety=TRAIN_VARIETY).example("variable_tracking", 1500, seed)
    value = re.search(r"assigned the value (\d+)", ex.question).group(1)
    direct = dict(re.findall(r"VAR ([A-Z]+) = (\d+)\.", ex.context))
    links = dict(re.findall(r"VAR ([A-Z]+) = VAR ([A-Z]+)\.", ex.context))
    assert len(direct) == int(ex.case["chains"]) and len(links) == int(ex.case["chains"]) * int(ex.case["hops"])

    def resolve(name: str) -> str:
        return direct[name] if name in direct else resolve(links[name])

    assert {name for name in [*direct, *links] if resolve(name) == value} == set(ex.answers)
    assert len(ex.answers) == int(ex.case["hops"]) + 1 and f"{len(ex.answers)} variables" in ex.question

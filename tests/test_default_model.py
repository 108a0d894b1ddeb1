"""The shipped default model: it loads with no arguments and answers the embedded demo."""

from __future__ import annotations

import pytest

from rcengine import Engine, EngineConfig, SamplingConfig, demo_prompt
from rcengine.bench.haystacks import corpus_haystack
from rcengine.bench.tasks import TaskGenerator, score


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(config=EngineConfig(method="rc", budget=0.02, offload="disk"), show_progress=False)


def test_default_model_is_a_small_gqa_llama(engine):
    model = engine.lm.model
    assert model.config.model_type == "llama"
    assert engine.lm.kv_shape == (8, 2, 64)  # 8 layers, 2 KV heads of dim 64
    assert model.config.num_attention_heads // model.config.num_key_value_heads >= 2
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 15e6


def test_demo_is_answered_with_rc_on_disk(engine):
    demo = demo_prompt()
    answer = engine.generate(demo.prompt, SamplingConfig(max_new_tokens=8))
    assert demo.answer in answer.text
    assert answer.stats["offload"] == "disk" and answer.stats["bytes"]["by_tier"]["disk"]["logical"] > 0


@pytest.mark.parametrize("method", ["dense", "topk", "rc"])
def test_needles_in_the_demo_text(engine, method):
    """Fresh needles at 2K tokens, in the demo's text, asked of one persisted document."""
    tok = engine.lm.tokenizer
    gen = TaskGenerator("eval", corpus_haystack([demo_prompt().document]), lambda s: len(tok(s)["input_ids"]))
    cfg = EngineConfig(method=method, budget=0.05, offload="cpu")
    results = []
    for seed in range(3):
        ex = gen.example("niah_single_number", 2000, seed)
        doc = Engine(engine.lm, cfg, show_progress=False).prefill(ex.context)
        results.append(score(doc.ask(ex.question, SamplingConfig(max_new_tokens=10)).text, ex.answers, ex.task))
        doc.close()
    assert sum(results) >= 2, results

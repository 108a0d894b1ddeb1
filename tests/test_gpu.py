"""CUDA paths against the CPU reference (skipped on machines without a GPU)."""

from __future__ import annotations

import pytest
import torch

from rcengine.engine import EstimatorSpec, LayerContext
from rcengine.storage import TierLayout, host_tier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("zero_copy", [True, False])
def test_host_tier_gathers_onto_the_gpu_exactly(gen, zero_copy):
    pytest.importorskip("cupy") if zero_copy else None
    lay = TierLayout(2, 4, 64, torch.bfloat16)
    tier = host_tier(lay, "cuda", zero_copy=zero_copy)
    k = torch.randn(4, 3000, 64, generator=gen).to(torch.bfloat16)
    v = torch.randn(4, 3000, 64, generator=gen).to(torch.bfloat16)
    tier.append(1, k[:, :1000], v[:, :1000], torch.arange(1000))
    tier.append(1, k[:, 1000:], v[:, 1000:], torch.arange(1000, 3000))  # grows: a new view
    assert tier.zero_copy is zero_copy
    ids = torch.randint(0, 3000, (4, 256), generator=gen)
    gk, gv = tier.gather(1, ids.cuda())
    assert gk.is_cuda
    for h in range(4):
        assert torch.equal(gk[h].cpu().view(torch.int16), k[h, ids[h]].view(torch.int16))
        assert torch.equal(gv[h].cpu().view(torch.int16), v[h, ids[h]].view(torch.int16))
    assert tier.meter.totals().h2d == 4 * 256 * lay.row_bytes


def test_attention_on_gpu_matches_cpu(gen):
    q = torch.randn(1, 8, 64, generator=gen)
    k = torch.randn(1, 2, 4096, 64, generator=gen)
    v = torch.randn(1, 2, 4096, 64, generator=gen)
    for kind in ("favor", "centroid"):
        cpu = LayerContext.build(k, v, 4, 64, EstimatorSpec(kind, 32, seed=1))
        gpu = LayerContext.build(k.cuda(), v.cuda(), 4, 64, EstimatorSpec(kind, 32, seed=1))
        for method in ("dense", "topk", "rc"):
            a = cpu.attend(q, method, 40)
            b = gpu.attend(q.cuda(), method, 40).cpu()
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), (kind, method)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("gpu") / "llama", "llama")


@pytest.mark.parametrize("selector", ["exact", "block"])
@pytest.mark.parametrize("method", ["rc", "topk", "dense"])
def test_captured_steps_equal_eager_steps(tiny_llama, method, selector, monkeypatch):
    """CUDA graphs replay the same computation as eager steps, across spills and re-plans (a
    plan horizon of 8 rows forces a new plan, and a new graph, every two spills)."""
    import rcengine.engine.decode.state as state_module
    from rcengine import Engine, EngineConfig, SamplingConfig

    monkeypatch.setattr(state_module, "PLAN_HORIZON", 8)
    ids = torch.randint(3, 300, (400,), generator=torch.Generator().manual_seed(5)).tolist()
    out = {}
    for graphs in (False, True):
        cfg = EngineConfig(method=method, budget=0.05, selector=selector, offload="cpu", sink=4, tail=16, spill=4, graphs=graphs)
        engine = Engine.load(tiny_llama, cfg, device="cuda", dtype=torch.float32, show_progress=False)
        doc = engine.prefill(ids)
        answer = doc.continue_prompt(SamplingConfig(max_new_tokens=40, ignore_eos=True))
        out[graphs] = (answer.token_ids, doc.runner.captures, answer.stats["bytes"]["logical"])
        doc.close()
    assert out[True][0] == out[False][0]
    assert out[True][2] == out[False][2]  # the same bytes metered
    assert out[False][1] == 0 and out[True][1] >= 2  # re-planned and recaptured as the mid-region grew


@pytest.mark.parametrize("offload,selector", [("cpu", "exact"), ("cpu", "block"), ("disk", "block")])
def test_captured_batch_steps_equal_eager_ones(tiny_llama, offload, selector):
    """Questions answered together with CUDA graphs (one per batch-size bucket, padded steps)
    give the answers and bytes of eager, unpadded steps."""
    from rcengine import Engine, EngineConfig, SamplingConfig

    ids = torch.randint(3, 300, (400,), generator=torch.Generator().manual_seed(5)).tolist()
    questions = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 4, 15, 2, 7)]
    out = {}
    for graphs in (False, True):
        cfg = EngineConfig(method="rc", budget=0.05, selector=selector, offload=offload, sink=4, tail=16, spill=4, graphs=graphs)
        engine = Engine.load(tiny_llama, cfg, device="cuda", dtype=torch.float32, show_progress=False)
        with engine.prefill(ids) as doc:
            doc.runner.capture_lanes = graphs
            answers = doc.ask_many(questions, SamplingConfig(max_new_tokens=12))
            out[graphs] = ([a.token_ids for a in answers], [a.stats["bytes"]["logical"] for a in answers], doc.runner.captures)
    assert out[True][0] == out[False][0]
    assert out[True][1] == out[False][1]
    assert out[False][2] == 0 and out[True][2] >= 1


@pytest.mark.parametrize("offload", ["cpu", "device"])
def test_captured_group_steps_equal_eager_ones(tiny_llama, offload):
    """Documents continued together with CUDA graphs (one per set of documents and plans; the
    tails spill as they go) give the tokens and bytes of eager steps."""
    from rcengine import Engine, EngineConfig, SamplingConfig

    prompts = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (300, 420, 260)]
    out = {}
    for graphs in (False, True):
        cfg = EngineConfig(method="rc", budget=0.05, selector="block", offload=offload, sink=4, tail=16, spill=4, graphs=graphs)
        engine = Engine.load(tiny_llama, cfg, device="cuda", dtype=torch.float32, show_progress=False)
        answers = engine.generate_many(prompts, SamplingConfig(max_new_tokens=14, ignore_eos=True))
        out[graphs] = ([a.token_ids for a in answers], [a.stats["bytes"]["logical"] for a in answers],
                       answers[0].stats["batch"]["graphs_captured"])
    assert out[True][0] == out[False][0]
    assert out[True][1] == out[False][1]
    assert out[False][2] == 0 and out[True][2] >= 1


@pytest.mark.parametrize("graphs", [False, True])
def test_group_steps_on_side_streams_equal_one_stream(tiny_llama, graphs, monkeypatch):
    """Each document's attention on a side stream of its own (forked and joined every layer)
    gives the tokens and bytes of all of them on the step's stream, eager and captured."""
    from rcengine import Engine, EngineConfig, SamplingConfig
    from rcengine.engine.hf import group

    prompts = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (300, 420, 260)]
    out = {}
    for streams in (False, True):
        monkeypatch.setattr(group, "STREAMS", streams)
        cfg = EngineConfig(method="rc", budget=0.05, selector="block", offload="cpu", sink=4, tail=16, spill=4, graphs=graphs)
        engine = Engine.load(tiny_llama, cfg, device="cuda", dtype=torch.float32, show_progress=False)
        answers = engine.generate_many(prompts, SamplingConfig(max_new_tokens=14, ignore_eos=True))
        out[streams] = ([a.token_ids for a in answers], [a.stats["bytes"]["logical"] for a in answers])
    assert out[True] == out[False]

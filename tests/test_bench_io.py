"""bench-io: its parts against references, and a small run's report checked for schema and sanity."""

from __future__ import annotations

import json
import os
import math
from pathlib import Path

import pytest
import torch

from rcengine import BenchIOConfig, Engine, EngineConfig, EstimatorSpec, SamplingConfig, load_model, run_bench_io, write_report
from rcengine.engine.rule.budget import retrieval_count
from rcengine.engine.hf.integration import reference_logits
from rcengine.bench.io_analysis import break_even, interpolate, matched_budget
from rcengine.storage import ByteMeter, host_tier
from rcengine.storage.tier import TierLayout
from conftest import logit_tolerance
from tiny_models import save_tiny_model

# -- the trade-off arithmetic ----------------------------------------------------------------------


def test_matched_budget_interpolates_in_log_budget():
    budgets, kl = [0.01, 0.04], [1.0, 0.5]
    b, how = matched_budget(budgets, kl, 0.75)  # half-way in quality: half-way in log budget
    assert how == "interpolated" and b == pytest.approx(0.02)
    assert matched_budget(budgets, kl, 1.5) == (0.01, "at most")
    assert matched_budget(budgets, kl, 0.1) == (None, "not reached")
    assert matched_budget([0.04, 0.01], [0.5, 1.0], 0.5) == (pytest.approx(0.04), "interpolated")  # order-free


def test_interpolate_is_linear_in_log_budget_and_clamped():
    assert interpolate([0.01, 0.04], [10.0, 30.0], 0.02) == pytest.approx(20.0)
    assert interpolate([0.01, 0.04], [10.0, 30.0], 0.001) == 10.0
    assert interpolate([0.01, 0.04], [10.0, 30.0], 0.5) == 30.0


def test_break_even_bandwidth():
    # 1 MB saved per token at 2 ms more compute: equal at 1 MB / 2 ms = 500 MB/s, rc faster below.
    assert break_even(1e6, 2.0) == {"bandwidth": pytest.approx(5e8), "rc_faster": "below"}
    assert break_even(1e6, -1.0)["rc_faster"] == "always"
    assert break_even(-1e6, 1.0)["rc_faster"] == "never"
    assert break_even(-1e6, -2.0) == {"bandwidth": pytest.approx(5e8), "rc_faster": "above"}


def test_paused_meter_counts_nothing():
    meter = ByteMeter()
    tier = host_tier(TierLayout(1, 2, 8, torch.float32), meter=meter)
    tier.append(0, torch.randn(2, 10, 8), torch.randn(2, 10, 8), torch.arange(10))
    with meter.paused():
        tier.gather(0, torch.zeros(2, 3, dtype=torch.int64))
    assert meter.totals().logical == 0
    tier.gather(0, torch.zeros(2, 3, dtype=torch.int64))
    assert meter.totals().logical == 2 * 3 * 2 * 8 * 4


# -- the engine hooks bench-io uses -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("bench_io") / "llama", "llama")


def _prompt(n: int = 400) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(3)).tolist()


def test_logits_under_dense_match_the_models_own_attention(tiny):
    engine = Engine.load(tiny, EngineConfig(method="dense", sink=4, tail=16), show_progress=False)
    ids, cont = _prompt(), _prompt(20)[:20]
    doc = engine.prefill(ids)
    before = doc.ask(cont[:5], SamplingConfig(max_new_tokens=6)).token_ids
    got = doc.logits(cont)
    (ref,) = reference_logits(engine.lm.model, ids, [cont])
    assert got.shape == ref.shape == (20, engine.lm.model.config.vocab_size)
    tol = 2e-4 if engine.lm.dtype == torch.float32 else logit_tolerance(engine.lm.dtype)
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    assert doc.ask(cont[:5], SamplingConfig(max_new_tokens=6)).token_ids == before  # the document is unchanged
    doc.close()


def test_switching_estimator_equals_prefilling_with_it(tiny):
    ids, cont = _prompt(), _prompt(12)[:12]
    favor = EstimatorSpec("favor", 16)
    base = dict(method="rc", budget=0.05, sink=4, tail=16)
    direct = Engine.load(tiny, EngineConfig(**base, estimator=favor), show_progress=False).prefill(ids)
    switched = Engine.load(tiny, EngineConfig(**base, estimator=EstimatorSpec("centroid", 16)), show_progress=False).prefill(ids)
    centroid_logits = switched.logits(cont)
    switched.configure(estimator=favor)
    reads = switched.meter.totals().logical
    torch.testing.assert_close(switched.logits(cont), direct.logits(cont), atol=1e-5, rtol=1e-5)
    assert switched.meter.totals().logical - reads == direct.meter.totals().logical  # building it was not metered
    switched.configure(estimator=EstimatorSpec("centroid", 16))
    torch.testing.assert_close(switched.logits(cont), centroid_logits, atol=0, rtol=0)  # switching back is exact
    switched.configure(method="topk", budget=0.1)
    assert switched.engine.config.method == "topk" and switched.state.config.budget == 0.1
    with pytest.raises(ValueError, match="budget"):
        switched.configure(budget=1.5)


# -- a small run, end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path]:
    cfg = BenchIOConfig(lengths=(600,), tasks=("niah_single_number",), examples=1, budgets=(0.02, 0.08), max_new_tokens=4,
                        heldout_tokens=8, probe_queries=2, timing_rounds=2, timing_tokens=3)
    lm = load_model()
    rep = run_bench_io(lm, cfg, show_progress=False)
    out = tmp_path_factory.mktemp("report")
    write_report(rep, out)
    return rep, out


def test_report_files_and_schema(report):
    rep, out = report
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "quality_vs_bytes.png", "rc_gain_by_entropy.png"}
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}  # as any new file, not 0600
    assert json.loads((out / "report.json").read_text())["overview"] == json.loads(json.dumps(rep["overview"]))
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Overview" in md and "rho*" in md and "| rc-centroid@0.02 | cpu |" in md
    variants = {"dense", "sink-tail", "topk@0.02", "topk@0.08"} | {f"rc-{e}@{b:g}" for e in ("centroid", "learned", "favor") for b in (0.005, 0.01, 0.02, 0.08)}
    for sel in ("exact-block", "block"):
        variants |= {f"topk-{sel}@{b:g}" for b in (0.02, 0.08)} | {f"rc-{e}-{sel}@{b:g}" for e in ("centroid", "learned", "favor") for b in (0.02, 0.08)}
    assert {r["variant"] for r in rep["overview"]} == variants
    assert {(r["variant"], r["tier"]) for r in rep["rows"]} == {(v, t) for v in variants for t in ("cpu", "disk")}
    for r in rep["rows"]:
        assert {"accuracy", "kl", "kl_answer", "kl_heldout", "loglik_delta", "bytes_per_token", "index_bytes_per_token",
                "token_equivalent", "ms_per_token", "modelled_ms_per_token", "task", "length"} <= set(r)
        assert set(r["modelled_ms_per_token"]) == {"ssd", "pcie"}
        assert r["answers_match_quality_tier"], r  # every tier attends identically
    features = {e: spec["num_features"] for e, spec in rep["meta"]["estimators"].items()}
    assert features == {"centroid": 64, "learned": 61, "favor": 126}  # equal summary bytes at head dim 64 (p = 4)
    assert {t["estimator"] for t in rep["tradeoff"]} == {"centroid", "learned", "favor"} and {t["length"] for t in rep["tradeoff"]} == {600}
    assert {(t["variant"], t["tier"], t["length"]) for t in rep["timing"]} == {(v, t, 600) for v in variants for t in ("cpu", "disk")}
    assert all(t["rounds"] == 2 and t["ms_per_token"] > 0 for t in rep["timing"])
    assert all(r["ms_per_token"] is not None for r in rep["overview"])
    assert {b["bin"] for b in rep["entropy_bins"]} == {"low", "mid", "high"}
    recall = {r["variant"]: r["recall_at_k"] for r in rep["overview"]}
    assert recall["topk@0.02"] == 1.0 and recall["dense"] is None
    for sel in ("exact-block", "block"):
        assert 0.0 <= recall[f"topk-{sel}@0.02"] <= 1.0 and recall[f"topk-{sel}@0.02"] == recall[f"rc-centroid-{sel}@0.02"]


def test_sanity_dense_is_the_reference_and_bytes_follow_the_budget(report):
    rep, _ = report
    rows = {(r["variant"], r["tier"]): r for r in rep["overview"]}
    dense = rows["dense", "cpu"]
    # Our dense attention against the model's own: float32 rounding, or bfloat16's on the GPU.
    kl_bound, ll_bound = (1e-6, 1e-4) if rep["meta"]["dtype"] == "float32" else (1e-2, 5e-2)
    assert dense["kl"] < kl_bound and abs(dense["loglik_delta_per_token"]) < ll_bound
    assert rows["sink-tail", "cpu"]["bytes_per_token"]["logical"] == 0
    mid = dense["mid_tokens"]
    assert dense["token_equivalent"]["support"] == pytest.approx(mid)  # dense reads every mid token once per step
    for family in ("topk", "rc-centroid", "rc-favor"):
        pts = sorted((r["budget"], r) for (v, t), r in rows.items() if t == "cpu" and v.startswith(family + "@"))
        for b, r in pts:  # exactly K = ceil(b |M|) tokens per KV head and layer, per decoded token
            assert r["token_equivalent"]["support"] == pytest.approx(retrieval_count(b, mid))
        logical = [r["bytes_per_token"]["logical"] for _, r in pts]
        assert logical == sorted(logical) and logical[0] < logical[-1]
    summary_tokens = rows["rc-centroid@0.02", "cpu"]["summary_tokens"]
    assert summary_tokens > 0 and rows["rc-centroid@0.02", "cpu"]["token_equivalent"]["bytes"] == pytest.approx(
        retrieval_count(0.02, mid) + summary_tokens)


def test_per_head_breakdown_is_consistent(report):
    rep, _ = report
    meta = rep["meta"]
    layers, q_heads = meta["kv_shape"]["layers"], 4
    for variant in ("sink-tail", "topk@0.02", "rc-centroid@0.02"):
        heads = [h for h in rep["heads"] if h["variant"] == variant]
        assert len(heads) == layers * q_heads
        assert all(0 <= h["residual_share"] <= 1 and h["rel_error"] >= 0 and 0 <= h["entropy"] <= 1 for h in heads)
    share = {(h["variant"], h["layer"], h["head"]): h["residual_share"] for h in rep["heads"]}
    for (v, layer, head), s in share.items():  # a larger budget leaves less mass unread, query by query
        if v == "topk@0.02":
            assert share["topk@0.08", layer, head] <= s + 1e-12
            assert share["sink-tail", layer, head] >= s - 1e-12
    for variant in ("topk@0.02", "rc-favor@0.08"):
        bins = [b for b in rep["entropy_bins"] if b["variant"] == variant]
        total = sum(b["head_queries"]["queries"] for b in bins if b["head_queries"])
        assert total == sum(h["queries"] for h in rep["heads"] if h["variant"] == variant)
    rc = [h for h in rep["heads"] if h["variant"] == "rc-centroid@0.08"]
    assert all(math.isfinite(h["mass_log_ratio"]) for h in rc if h["mass_log_ratio"] is not None)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="budgets"):
        BenchIOConfig(budgets=(2.0,))
    with pytest.raises(ValueError, match="unknown task"):
        BenchIOConfig(tasks=("nope",))
    with pytest.raises(ValueError, match="tiers"):
        BenchIOConfig(tiers=("tape",))
    with pytest.raises(ValueError, match="estimator"):
        BenchIOConfig(estimators=("hedgehog",))


def test_ignore_eos_decodes_a_fixed_number_of_steps(tiny):
    engine = Engine.load(tiny, EngineConfig(method="rc", budget=0.05, sink=4, tail=16), show_progress=False)
    doc = engine.prefill(_prompt())
    first = doc.ask(_prompt(3)[:3], SamplingConfig(max_new_tokens=1)).token_ids[0]
    engine.lm.model.generation_config.eos_token_id = first  # the greedy answer now ends at once
    assert doc.ask(_prompt(3)[:3], SamplingConfig(max_new_tokens=5)).token_ids == []
    timed = doc.ask(_prompt(3)[:3], SamplingConfig(max_new_tokens=5, ignore_eos=True))
    assert len(timed.token_ids) == 5 and timed.stats["decode_steps"] == 4

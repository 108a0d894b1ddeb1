"""The engine on tiny Llama, Qwen2 and Mistral models against stock transformers decoding."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rcengine.engine.config import EngineConfig
from rcengine.engine.sampling import SamplingConfig
from rcengine.engine.qa.engine import Engine
from rcengine.storage import StreamedFlatIndex
from conftest import logit_tolerance
from rcengine.engine.decode.state import PLAN_HORIZON
from rcengine.engine.decode import kernels
from rcengine.storage import DiskTier
from tiny_models import FAMILIES, save_tiny_model

PROMPT_LEN, NEW = 300, 12


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny_model(root / family, family) for family in FAMILIES}


def _prompt(seed: int = 1, n: int = PROMPT_LEN) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(path: Path, **kw) -> Engine:
    base = {"sink": 4, "tail": 16, "spill": 4, "budget": 1.0}
    return Engine.load(path, EngineConfig(**(base | kw)), show_progress=False)


def _decode_logits(engine: Engine, ids: list[int], new: int, defer_fills: bool = False) -> tuple[list[int], torch.Tensor, int]:
    """Greedy decoding through the engine's step runner, keeping every step's logits ``(new, vocab)``
    on the CPU.  ``defer_fills``: disk steps fill missing blocks between runs, as captured ones do."""
    doc = engine.prefill(ids)
    doc.runner.defer_fills = defer_fills
    logits, out, rows = doc.last_logits, [], []
    with torch.no_grad():
        for i in range(new):
            rows.append(logits[0].cpu())
            out.append(int(logits[0].argmax()))
            logits = doc.runner.run([out[-1]], len(ids) + i)
    spilled = doc.state.spilled
    assert doc.state.tier.num_rows(0) == len(ids) - engine.config.sink - engine.config.tail + spilled
    doc.close()
    return out, torch.stack(rows), spilled


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["topk", "rc"])
def test_full_budget_matches_stock_decoding(models, family, method):
    engine = _engine(models[family], method=method)
    ids = _prompt()
    model = engine.lm.model
    dev = engine.lm.device
    stock = model.generate(torch.tensor([ids], device=dev), max_new_tokens=NEW, do_sample=False)[0, PROMPT_LEN:].tolist()
    ours, logits, spilled = _decode_logits(engine, ids, NEW)
    assert ours == stock
    assert spilled > 0  # the tail (16 + 4) overflowed and spilled into the tier, selection state and summary
    with torch.no_grad():  # teacher-forced stock logits at the same positions
        ref = model(torch.tensor([ids + ours], device=dev)).logits[0, PROMPT_LEN - 1 : PROMPT_LEN - 1 + NEW].float().cpu()
    tol = logit_tolerance(engine.lm.dtype)
    assert torch.allclose(logits, ref, rtol=tol, atol=tol), (logits - ref).abs().max()
    # generate() through the public API gives the same tokens (and spills: tail 16 + spill 4 < 12 new)
    answer = engine.generate(ids, SamplingConfig(max_new_tokens=NEW))
    assert answer.token_ids == stock


@pytest.mark.parametrize("selector", ["exact", "block"])
def test_cpu_and_disk_offload_are_identical(models, tmp_path, selector):
    ids = _prompt(seed=3)
    kw = {"method": "rc", "budget": 0.05, "selector": selector, "select_block": 16}
    cpu = _decode_logits(_engine(models["llama"], offload="cpu", **kw), ids, NEW)
    disk = _decode_logits(_engine(models["llama"], offload="disk", scratch_dir=str(tmp_path), **kw), ids, NEW)
    deferred = _decode_logits(_engine(models["llama"], offload="disk", scratch_dir=str(tmp_path), **kw), ids, NEW, defer_fills=True)
    dev = _decode_logits(_engine(models["llama"], offload="device", **kw), ids, NEW)
    assert cpu[0] == disk[0] == deferred[0] == dev[0]
    # The same rows in the same order reach the same computation: bit-identical on the CPU.  On a
    # GPU, captured steps' plans pad K (masked rows), eager steps do not: sums of other widths, equal
    # to rounding.
    tol = 0.0 if torch.device(_engine(models["llama"]).lm.device).type == "cpu" else logit_tolerance(torch.bfloat16)
    for other in (disk, deferred, dev):
        assert torch.allclose(cpu[1], other[1], rtol=tol, atol=tol)
    assert not list(tmp_path.iterdir())  # the scratch store is removed with its document


def test_disk_reads_whole_selected_blocks_and_nothing_else(models, tmp_path):
    """The block selector on disk selects the store's blocks: a cold read is what was asked for."""
    engine = _engine(models["llama"], method="rc", budget=0.1, offload="disk", block_tokens=16, selector="block")
    assert engine.config.resolved().select_block == 16
    doc = engine.prefill(_prompt(seed=5, n=600), store=tmp_path / "doc")
    assert doc.state.selectors[0].block == 16
    block_bytes = 16 * engine.lm.kv_shape[2] * 2 * (torch.finfo(engine.lm.dtype).bits // 8)

    def cold_answer() -> tuple:  # the question's first step (its prefill), with an empty block cache
        doc.drop_caches()
        first = doc.meter.next_step()
        doc.ask(_prompt(seed=6, n=7), SamplingConfig(max_new_tokens=3))
        return doc.meter.totals(tier="disk", step=first + 1), doc.meter.totals(tier="disk", since=first)

    cold, total = cold_answer()
    # every block read is a selected unit: physical bytes are whole blocks, at most what was asked
    # for (the question's 7 positions ask for some blocks more than once)
    assert cold.cache_misses > 0 and cold.physical == cold.cache_misses * block_bytes <= cold.logical
    assert total.cache_hits > 0 and total.physical <= total.logical
    # single rows (exact Top-K) read whole store blocks: more bytes than they ask for
    doc.configure(selector="exact")
    cold_exact, _ = cold_answer()
    assert cold_exact.physical / cold_exact.logical > 1.5 * cold.physical / cold.logical


@pytest.mark.parametrize("method", ["dense", "topk", "rc", "sink-tail"])
def test_metered_bytes_match_the_layout(models, method):
    engine = _engine(models["llama"], method=method, budget=0.1, offload="cpu")
    doc = engine.prefill(_prompt(seed=5))
    answer = doc.ask(_prompt(seed=6, n=7), SamplingConfig(max_new_tokens=5))
    layers, heads, dim = engine.lm.kv_shape
    elt = torch.finfo(engine.lm.dtype).bits // 8
    mid = PROMPT_LEN - 4 - 16
    per_row = 2 * dim * elt  # key + value in the model's dtype
    retrieved = mid if method == "dense" else (0 if method == "sink-tail" else -(-mid // 10))
    steps = answer.stats["decode_steps"]  # one forward per new token but the last (or all, ending at EOS)
    assert answer.new_tokens - 1 <= steps <= answer.new_tokens
    queries = 7 + steps
    assert answer.stats["queries"] == queries
    assert answer.stats["bytes"]["logical"] == layers * heads * retrieved * per_row * queries
    physical = answer.stats["bytes"]["by_tier"].get("cpu", {"physical": 0})["physical"]
    index = answer.stats["bytes"]["index"]
    # Eager steps read exactly what the rule asks for.  On CUDA, single-token steps replay a graph
    # whose plan covers PLAN_HORIZON more rows (spills to come): padded rows are moved, and metered
    # as physical bytes only.
    captured = doc.runner.captures > 0
    padded_mid = mid + (PLAN_HORIZON if captured else 0)
    assert physical == answer.stats["bytes"]["logical"] if not captured else physical >= answer.stats["bytes"]["logical"]
    if method in ("topk", "rc"):  # the exact selector reads every mid key once per forward (question batch, steps)
        assert layers * heads * mid * dim * elt * (1 + steps) <= index <= layers * heads * padded_mid * dim * elt * (1 + steps)
        assert answer.stats["bytes"]["index_by_tier"] == {"device": index}
    assert answer.stats["token_equivalent"]["support"] == pytest.approx(retrieved)
    assert answer.stats["budget"] == (0.1 if method in ("topk", "rc") else None)


def test_questions_leave_the_document_unchanged(models):
    engine = _engine(models["qwen2"], method="rc", budget=0.05)
    doc = engine.prefill(_prompt(seed=7))
    q1, q2 = _prompt(seed=8, n=9), _prompt(seed=9, n=4)
    a1 = doc.ask(q1, SamplingConfig(max_new_tokens=6))
    doc.ask(q2, SamplingConfig(max_new_tokens=30))  # longer than tail + spill: nothing may spill
    assert doc.state.tier.num_rows(0) == PROMPT_LEN - 4 - 16
    assert doc.ask(q1, SamplingConfig(max_new_tokens=6)).token_ids == a1.token_ids


_REOPEN = textwrap.dedent(
    """
    import json, sys
    from rcengine.engine.config import EngineConfig
    from rcengine.engine.sampling import SamplingConfig
    from rcengine.engine.qa.engine import Engine
    engine = Engine.load(sys.argv[1], EngineConfig(method="rc", budget=0.05, selector=sys.argv[4]), show_progress=False)
    doc = engine.open(sys.argv[2])
    print(json.dumps(doc.ask(json.loads(sys.argv[3]), SamplingConfig(max_new_tokens=8)).token_ids))
    """
)


@pytest.mark.parametrize("selector", ["exact", "block", "faiss"])
def test_persisted_document_reopens_in_a_new_process(models, tmp_path, selector):
    engine = _engine(models["mistral"], method="rc", budget=0.05, offload="disk", selector=selector)
    question = _prompt(seed=11, n=6)
    doc = engine.prefill(_prompt(seed=10), store=tmp_path / "doc")
    here = doc.ask(question, SamplingConfig(max_new_tokens=8)).token_ids
    doc.close()
    reopened = engine.open(tmp_path / "doc")
    assert reopened.ask(question, SamplingConfig(max_new_tokens=8)).token_ids == here
    out = subprocess.run([sys.executable, "-c", _REOPEN, str(models["mistral"]), str(tmp_path / "doc"), json.dumps(question), selector],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
    # Reading starts from the store: no KV row was loaded at open.
    assert reopened.meter.totals(step=0).logical == 0
    if selector == "faiss":  # the flat index's keys stay in the store too (read block by block), unless asked for in memory
        assert isinstance(reopened.state.index._indexes[0][0], StreamedFlatIndex)
        cfg = EngineConfig(method="rc", budget=0.05, selector="faiss", keys_in_memory=True)
        in_memory = Engine(engine.lm, cfg, show_progress=False).open(tmp_path / "doc")
        assert not isinstance(in_memory.state.index._indexes[0][0], StreamedFlatIndex)
        assert in_memory.ask(question, SamplingConfig(max_new_tokens=8)).token_ids == here


@pytest.mark.parametrize("selector", ["block", "exact"])
def test_reopened_selection_state_is_read_not_rebuilt(models, tmp_path, selector, monkeypatch):
    """The KV rows are written once (no second copy of the keys), the block selector's bounds are
    saved and loaded (no KV row read at open), and the exact selector's keys come from the KV store."""
    engine = _engine(models["qwen2"], method="rc", budget=0.1, offload="disk", selector=selector, block_tokens=16)
    doc = engine.prefill(_prompt(seed=20, n=500), store=tmp_path / "doc")
    question = _prompt(seed=21, n=6)
    here = doc.ask(question, SamplingConfig(max_new_tokens=6)).token_ids
    fresh = [s.saved() for s in doc.state.selectors] if selector == "block" else None
    doc.close()
    assert not list((tmp_path / "doc").glob("keys-*"))  # only the faiss selector's flat index needs key files
    read_blocks, kv_read = DiskTier._read_blocks, []

    def counted(self, layer, wanted):  # noqa: ANN001, ANN202
        out = read_blocks(self, layer, wanted)
        kv_read.extend(x.nbytes for x in out.values())
        return out

    monkeypatch.setattr(DiskTier, "_read_blocks", counted)
    reopened = engine.open(tmp_path / "doc")
    layers, heads, dim = engine.lm.kv_shape
    chunk = reopened.state.tier.chunk_tokens  # rows past the last whole chunk are read into memory at open
    kv_bytes = layers * heads * (reopened.state.mid_len // chunk * chunk) * 2 * dim * (torch.finfo(engine.lm.dtype).bits // 8)
    assert kv_bytes > 0
    if selector == "block":
        assert not kv_read
        for sel, saved in zip(reopened.state.selectors, fresh, strict=True):
            assert torch.equal(sel.saved()["kmax"], saved["kmax"]) and torch.equal(sel.saved()["kmin"], saved["kmin"])
    else:  # every key, read once (with its value) from the KV store
        assert sum(kv_read) == kv_bytes
    assert reopened.ask(question, SamplingConfig(max_new_tokens=6)).token_ids == here


def test_reopened_document_loads_the_centroid_ids(models, tmp_path, monkeypatch):
    """The centroid of every mid row (read by the fused kernels: CUDA, or Triton's interpreter) is
    saved with the document and loaded (no KV row read at open), equal to the one computed at
    prefill; answers agree."""
    engine = _engine(models["llama"], method="rc", budget=0.1, offload="disk", block_tokens=16, selector="block")
    if not kernels.available(torch.device(engine.lm.device)):
        pytest.skip("needs the fused kernels (CUDA, or TRITON_INTERPRET=1 with Triton installed)")
    ids = torch.randint(3, 300, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    doc = engine.prefill(ids, store=tmp_path / "doc")
    question = torch.randint(3, 300, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    here = doc.ask(question, SamplingConfig(max_new_tokens=6)).token_ids
    n = doc.state.mid_len
    fresh = [c[:, :n].clone() for c in doc.state.clusters]
    assert all(c is not None for c in doc.state.clusters)
    doc.close()
    read_blocks, kv_read = DiskTier._read_blocks, []
    monkeypatch.setattr(DiskTier, "_read_blocks", lambda self, layer, wanted: kv_read.append(wanted) or read_blocks(self, layer, wanted))
    reopened = engine.open(tmp_path / "doc")
    assert not kv_read
    for a, b in zip(reopened.state.clusters, fresh, strict=True):
        assert torch.equal(a[:, :n], b)
    assert reopened.ask(question, SamplingConfig(max_new_tokens=6)).token_ids == here


def test_persisted_from_cpu_offload_and_reopened_into_memory(models, tmp_path):
    engine = _engine(models["llama"], method="topk", budget=0.05, offload="cpu")
    question = _prompt(seed=13, n=5)
    doc = engine.prefill(_prompt(seed=12), store=tmp_path / "doc")
    here = doc.ask(question, SamplingConfig(max_new_tokens=6)).token_ids
    for offload in ("disk", "cpu"):
        assert engine.open(tmp_path / "doc", offload=offload).ask(question, SamplingConfig(max_new_tokens=6)).token_ids == here


def test_store_made_by_another_model_is_refused(models, tmp_path):
    from rcengine.storage import ModelMismatchError

    _engine(models["llama"], offload="disk").prefill(_prompt(), store=tmp_path / "doc").close()
    with pytest.raises(ModelMismatchError, match="llama.*qwen2"):
        _engine(models["qwen2"]).open(tmp_path / "doc")


def test_bad_input(models, tmp_path):
    engine = _engine(models["llama"])
    with pytest.raises(ValueError, match="exceed"):
        engine.generate(_prompt(n=4090), SamplingConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.prefill([])
    with pytest.raises(ValueError, match="budget"):
        EngineConfig(budget=0.0)


def test_unsupported_architectures_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from rcengine.engine.hf.loader import load_model

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        load_model(tmp_path / "gpt2")
    path = save_tiny_model(tmp_path / "windowed", "mistral")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"sliding_window": 64}))
    with pytest.raises(ValueError, match="sliding-window"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_sampling_is_seeded(models):
    engine = _engine(models["llama"], method="rc", budget=0.05)
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=4)
    a = engine.generate(_prompt(), s).token_ids
    assert a == engine.generate(_prompt(), s).token_ids
    streamed: list[str] = []
    answer = engine.generate(_prompt(), s, on_text=streamed.append)
    assert "".join(streamed) == answer.text


def test_long_work_prints_progress_lines_in_a_log(models, monkeypatch, capsys):
    """Without a terminal (a log, CI), prefill reports progress as plain lines."""
    import rcengine.engine.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    engine = Engine.load(models["llama"], EngineConfig(prefill_chunk=64), show_progress=True)
    engine.prefill(_prompt()).close()
    err = capsys.readouterr().err
    assert "prefill: 64/300 tokens" in err and "done in" in err


@pytest.mark.parametrize("selector", ["block", "exact"])
def test_disk_steps_read_the_block_cache_in_place(models, tmp_path, selector):
    """Steps on the disk tier look their blocks up in the block cache with tensor operations only,
    flag the missing ones, and run again once they are read (as a captured step must): the same
    tokens and logits as steps that read each layer's blocks at once, and as the host tier.  A
    repeated answer finds every block resident: no read, no second run."""
    ids, question = _prompt(seed=30, n=400), _prompt(seed=31, n=7)
    kw = {"method": "rc", "budget": 0.1, "selector": selector, "block_tokens": 16}
    results = {}
    for name, offload, deferred in (("host", "cpu", False), ("eager", "disk", False), ("deferred", "disk", True)):
        doc = _engine(models["llama"], offload=offload, scratch_dir=str(tmp_path), **kw).prefill(ids)
        doc.runner.defer_fills = deferred
        answers = []
        for _ in range(2):  # cold, then warm
            doc.drop_caches() if not answers else None
            first = doc.meter.next_step()
            reruns = doc.runner.reruns
            answer = doc.ask(question, SamplingConfig(max_new_tokens=6, ignore_eos=True))
            answers.append((answer.token_ids, doc.meter.totals(tier="disk", since=first), doc.runner.reruns - reruns))
        assert doc.state.reads_blocks_in_place() == (offload == "disk")
        results[name] = answers, doc.runner.use_graphs
        doc.close()
    assert results["host"][0][0][0] == results["eager"][0][0][0] == results["deferred"][0][0][0]
    lm = _engine(models["llama"]).lm
    block_bytes = 16 * 2 * lm.kv_shape[2] * (torch.finfo(lm.dtype).bits // 8)
    for name in ("eager", "deferred"):
        ((_, cold, cold_runs), (_, warm, warm_runs)), captured = results[name]
        assert cold.cache_misses > 0 and cold.physical == cold.cache_misses * block_bytes
        assert warm.physical == 0 and warm.cache_misses == 0 and warm.cache_hits > 0 and warm_runs == 0
        if name == "deferred":  # the question's step too: some blocks are read between runs
            assert cold_runs > 0
        elif not captured:  # captured steps (CUDA) defer; here the question's eager step may read them all
            assert cold_runs == 0


def test_prefill_to_disk_streams_the_mid_rows_between_chunks(models, tmp_path, monkeypatch):
    """A prefill to disk writes finished mid rows while the next chunks run, as whole chunk files:
    the store ends with exactly the host tier's rows and positions, and decoding is identical."""
    ids = _prompt(seed=40, n=600)
    kw = {"method": "rc", "budget": 0.1, "selector": "block", "block_tokens": 16, "prefill_chunk": 50}
    host = _engine(models["llama"], offload="cpu", **kw).prefill(ids)
    disk_engine = _engine(models["llama"], offload="disk", scratch_dir=str(tmp_path), **kw)
    appended = []
    real_append = DiskTier.append

    def counted(self, layer, keys, values, positions):  # noqa: ANN001, ANN202
        appended.append((layer, int(positions[0]), keys.shape[1]))
        return real_append(self, layer, keys, values, positions)

    monkeypatch.setattr(DiskTier, "append", counted)
    disk = disk_engine.prefill(ids)
    # written while the prefill runs, in whole chunk files (16 blocks of 16 tokens), the rest at the end
    sizes = [m for layer, _, m in appended if layer == 0]
    assert len(sizes) > 2 and all(m == 256 for m in sizes[:-1]) and disk.state.tier.chunk_tokens == 256
    n = host.state.mid_len
    assert disk.state.mid_len == n == 600 - 4 - 16
    for layer in range(host.state.num_layers):
        every = torch.arange(n).expand(host.state.num_kv_heads, n)
        assert all(torch.equal(a, b) for a, b in zip(host.state.tier.gather(layer, every), disk.state.tier.gather(layer, every), strict=True))
        assert (host.state.tier.positions(layer) == disk.state.tier.positions(layer)).all()
    question = _prompt(seed=41, n=5)
    assert host.ask(question, SamplingConfig(max_new_tokens=6)).token_ids == disk.ask(question, SamplingConfig(max_new_tokens=6)).token_ids
    disk.close()


def test_a_block_cache_too_small_for_a_layer_is_refused_clearly(models, tmp_path):
    """A step whose layer needs more blocks at once than the disk tier's cache holds is refused
    with the setting to raise (a ValueError: the CLI prints it as one line, exit code 2)."""
    lm = _engine(models["llama"]).lm
    slot = 16 * 2 * lm.kv_shape[2] * (torch.finfo(lm.dtype).bits // 8)
    engine = _engine(models["llama"], method="rc", budget=0.2, offload="disk", selector="block", block_tokens=16,
                     cache_bytes=3 * slot, scratch_dir=str(tmp_path))
    doc = engine.prefill(_prompt(seed=50, n=400))
    with pytest.raises(ValueError, match="--cache-mb"):
        doc.ask(_prompt(seed=51, n=5), SamplingConfig(max_new_tokens=2))
    doc.close()


def test_a_closed_document_answers_nothing(models, tmp_path):
    engine = _engine(models["llama"], offload="disk", method="rc", budget=0.1)
    doc = engine.prefill(_prompt(), store=tmp_path / "store")
    doc.close()
    doc.close()  # closing twice is harmless
    assert doc.closed
    for call in (lambda: doc.ask([5]), lambda: doc.logits([5, 6]), lambda: doc.configure(budget=0.2), doc.continue_prompt):
        with pytest.raises(ValueError, match=r"this document is closed .*reopen it with engine.open\("):
            call()
    again = engine.open(tmp_path / "store")
    assert not again.closed and again.ask([5], SamplingConfig(max_new_tokens=1)).new_tokens == 1
    again.close()
    scratch = engine.prefill(_prompt())
    scratch.close()
    with pytest.raises(ValueError, match="this document is closed .*prefill it again"):
        scratch.ask([5])

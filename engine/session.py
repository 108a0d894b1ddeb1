"""The public API: load a model once, prefill a document once, ask it many questions.

    engine = Engine.load("path/to/model", EngineConfig(method="rc", budget=0.02, offload="disk"))
    doc = engine.prefill(text, store="doc.rcs")    # persisted: reopen later with engine.open
    answer = doc.ask("What is the special magic number for ...?")
    print(answer.text, answer.stats["bytes"]["logical"])

A document is one sequence (batch 1).  Questions do not change it: the question and answer tokens
join the tail and are dropped afterwards (the tail is sized so nothing spills meanwhile).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..storage import (
    Artifact,
    ArtifactWriter,
    ByteMeter,
    DiskTier,
    IndexSpec,
    KeyIndex,
    KVTier,
    MemoryTier,
    TierLayout,
    device_tier,
    host_tier,
)
from ..storage.rows import dtype_name
from .budget import retrieval_count
from .cache import RCCache, _Growable
from .config import EngineConfig
from .feature_maps import EstimatorSpec, feature_map_from_tensors, feature_map_tensors
from .hf_integration import forward_logits
from .model_loader import LoadedModel, load_model
from .progress import progress_bar
from .sampling import SamplingConfig, sample_next
from .summary import Summary


@dataclass
class Answer:
    """Generated text and what it cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int  # tokens the answer was conditioned on (document + question)
    new_tokens: int
    stats: dict[str, Any] = field(default_factory=dict)


class Engine:
    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None, show_progress: bool = True) -> None:
        self.lm = lm
        self.config = config if config is not None else EngineConfig()
        self.show_progress = show_progress

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        config: EngineConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        show_progress: bool = True,
    ) -> "Engine":
        """Load a local model folder (None: the embedded default model)."""
        return cls(load_model(model, device, dtype, trust_remote_code), config, show_progress)

    # -- documents ----------------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return list(self.lm.tokenizer(text, add_special_tokens=special)["input_ids"])

    def prefill(self, document: str | list[int], store: str | Path | None = None, overwrite: bool = False) -> "Document":
        """Prefill ``document`` (text, or token ids) once.  With ``store`` it is also persisted
        there, to be reopened by :meth:`open` in another process or on another machine."""
        ids = self.tokenize(document) if isinstance(document, str) else list(document)
        if not ids:
            raise ValueError("the document is empty")
        if len(ids) >= self.lm.max_positions:
            raise ValueError(f"the document has {len(ids)} tokens; the model handles at most {self.lm.max_positions} positions")
        cfg = self.config
        meter = ByteMeter()
        writer = ArtifactWriter(store, overwrite=overwrite) if store is not None else None
        scratch = None
        try:
            if cfg.offload == "disk":
                if writer is not None:
                    location = writer.kv_location
                else:
                    scratch = tempfile.mkdtemp(prefix="rcengine-kv-", dir=cfg.store)
                    location = f"{scratch}/kv.zarr"
                tier: KVTier = DiskTier.create(location, self._layout(), cfg.block_tokens, cfg.cache_bytes, self.lm.device, meter)
            else:
                tier = self._memory_tier(meter)
            t0 = time.perf_counter()
            with torch.no_grad():
                cache, last_logits = self._run_prefill(ids, tier, meter)
            prefill_ms = 1e3 * (time.perf_counter() - t0)
            if writer is not None:
                self._persist(cache, ids, writer)
                if isinstance(tier, DiskTier):
                    tier.close()
                    art = Artifact.open(store)
                    cache.tier = DiskTier.open(art.kv_location, cfg.cache_bytes, self.lm.device, meter, art.kv_checksums)
        except BaseException:
            if writer is not None:
                writer.abort()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        return Document(self, cache, len(ids), last_logits, prefill_ms, store=str(store) if store else None, scratch=scratch)

    def open(self, store: str | Path, offload: str | None = None) -> "Document":
        """Reopen a persisted document without recomputing its prefill.  The KV stays in the store
        and is read as needed (``offload`` ``cpu`` or ``device`` copies it into memory instead)."""
        art = Artifact.open(store, expect_fingerprint=self.lm.fingerprint())
        meta = art.meta
        layers, heads, dim = self.lm.kv_shape
        if (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"], meta["dtype"]) != (layers, heads, dim, dtype_name(self.lm.dtype)):
            raise ValueError(f"{store} holds a KV layout the loaded model does not have: {meta}")
        cfg = replace(
            self.config, sink=meta["sink"], tail=meta["tail"], offload=offload or "disk",
            estimator=EstimatorSpec(**meta["estimator"]), index=IndexSpec(**meta["index"]), block_tokens=meta["block_tokens"],
        )
        meter = ByteMeter()
        disk = DiskTier.open(art.kv_location, cfg.cache_bytes, self.lm.device, meter, art.kv_checksums)
        tier: KVTier = disk
        if cfg.offload != "disk":
            tier = self._memory_tier(meter)
            for layer in range(layers):
                n = disk.num_rows(layer)
                k, v = disk.gather(layer, torch.arange(n).expand(heads, n))
                tier.append(layer, k.to(self.lm.dtype), v.to(self.lm.dtype), torch.from_numpy(disk.positions(layer)))
            disk.close()
            meter.reset()
        index = KeyIndex(cfg.index, layers, heads, dim, meter)
        anchors = art.read_tensors("anchors")
        summaries = art.read_tensors("summaries")
        dev = self.lm.device
        cache = RCCache(cfg, layers, heads, dim, self.lm.dtype, dev, tier, index, meter)
        for layer, st in enumerate(cache.state):
            for head in range(heads):
                if cfg.index.kind != "flat":
                    index.load(layer, head, art.read_bytes(f"index-L{layer}-H{head}.bin"))
                elif cfg.offload == "disk" and not cfg.keys_in_memory:
                    reader = art.block_reader(_keys_file(layer, head))
                    index.attach_streamed(layer, head, reader, reader.size // (4 * dim))
                else:
                    index.load_keys(layer, head, np.frombuffer(art.read_bytes(_keys_file(layer, head)), dtype=np.float32).reshape(-1, dim))
            p = f"L{layer}."
            st.prefill = None
            st.sink_k, st.sink_v = anchors[p + "sink_k"].to(dev), anchors[p + "sink_v"].to(dev)
            st.tail = _Growable(heads, dim, self.lm.dtype, dev, cfg.tail + cfg.spill + 64)
            st.tail.append(anchors[p + "tail_k"].to(dev), anchors[p + "tail_v"].to(dev), anchors[p + "tail_pos"])
            st.seen = meta["tokens"]
            if cfg.estimator.kind != "none":
                fm = {k.removeprefix(p + "map."): v for k, v in summaries.items() if k.startswith(p + "map.")}
                st.feature_map = feature_map_from_tensors(cfg.estimator.kind, fm, dev)
                sd = {k.removeprefix(p + "summary."): v.to(dev) for k, v in summaries.items() if k.startswith(p + "summary.")}
                st.summary = Summary.from_state_dict(sd)
        cache.phase = "decode"
        engine = Engine(self.lm, cfg, self.show_progress)
        return Document(engine, cache, meta["tokens"], None, 0.0, store=str(store), scratch=None)

    def generate(
        self, prompt: str | list[int], sampling: SamplingConfig | None = None, on_text: Callable[[str], None] | None = None,
        store: str | Path | None = None,
    ) -> Answer:
        """Prefill ``prompt`` and continue it.  Tail tokens spill as generation grows."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        sampling = sampling or SamplingConfig()
        self._check_length(len(ids), sampling.max_new_tokens)
        doc = self.prefill(ids, store=store)
        try:
            return doc.continue_prompt(sampling, on_text)
        finally:
            doc.close()

    # -- internals ----------------------------------------------------------------------------

    def _layout(self) -> TierLayout:
        layers, heads, dim = self.lm.kv_shape
        return TierLayout(layers, heads, dim, self.lm.dtype)

    def _memory_tier(self, meter: ByteMeter) -> MemoryTier:
        if self.config.offload == "device":
            return device_tier(self._layout(), self.lm.device, meter)
        return host_tier(self._layout(), self.lm.device, meter)

    def _check_length(self, prompt_tokens: int, new_tokens: int) -> None:
        if prompt_tokens + new_tokens > self.lm.max_positions:
            raise ValueError(
                f"{prompt_tokens} prompt tokens + {new_tokens} new tokens exceed the model's {self.lm.max_positions} positions: "
                "shorten the prompt or ask for fewer tokens"
            )

    def _run_prefill(self, ids: list[int], tier: KVTier, meter: ByteMeter) -> tuple[RCCache, torch.Tensor]:
        layers, heads, dim = self.lm.kv_shape
        cfg = self.config
        index = KeyIndex(cfg.index, layers, heads, dim, meter)
        cache = RCCache(cfg, layers, heads, dim, self.lm.dtype, self.lm.device, tier, index, meter)
        x = torch.tensor(ids, device=self.lm.device)[None]
        with progress_bar("prefill (tokens)", len(ids), self.show_progress) as advance:
            for start in range(0, len(ids), cfg.prefill_chunk):
                chunk = x[:, start : start + cfg.prefill_chunk]
                logits = forward_logits(self.lm.model, chunk, cache, start)
                advance(chunk.shape[1])
        with progress_bar("offloading, key index and summaries (layers)", layers, self.show_progress) as advance:
            cache.finalize_prefill(progress=lambda _layer: advance(1))
        if isinstance(tier, DiskTier) and not tier.read_only:
            tier.flush()
        return cache, logits

    def _persist(self, cache: RCCache, ids: list[int], writer: ArtifactWriter) -> None:
        cfg = self.config
        layers, heads, dim = self.lm.kv_shape
        tier = cache.tier
        if not isinstance(tier, DiskTier):  # persisted form is always a Zarr store
            disk = DiskTier.create(writer.kv_location, self._layout(), cfg.block_tokens)
            for layer in range(layers):
                rows = tier.rows(layer)
                disk.append(layer, rows[:, :, 0], rows[:, :, 1], torch.from_numpy(tier.positions(layer)))
            disk.flush()
            checksums = disk.checksums
            disk.close()
        else:
            checksums = tier.checksums
        anchors: dict[str, torch.Tensor] = {"doc_ids": torch.tensor(ids, dtype=torch.int64)}
        summaries: dict[str, torch.Tensor] = {}
        for layer, st in enumerate(cache.state):
            p = f"L{layer}."
            tk, tv = st.tail.view()
            anchors.update({p + "sink_k": st.sink_k, p + "sink_v": st.sink_v, p + "tail_k": tk, p + "tail_v": tv,
                            p + "tail_pos": st.tail.pos[: st.tail.n]})
            if st.feature_map is not None:
                summaries.update({p + "map." + k: v for k, v in feature_map_tensors(st.feature_map).items()})
                summaries.update({p + "summary." + k: v for k, v in st.summary.state_dict().items()})
            for head in range(heads):
                if cfg.index.kind == "flat":  # plain keys: searched in memory or read block by block
                    writer.put_bytes(_keys_file(layer, head), cache.index.keys(layer, head).tobytes(), block_bytes=KEY_BLOCK_ROWS * dim * 4)
                else:
                    writer.put_bytes(f"index-L{layer}-H{head}.bin", cache.index.serialize(layer, head))
        writer.put_tensors("anchors", anchors)
        writer.put_tensors("summaries", summaries)
        meta = {
            "tokens": len(ids), "num_layers": layers, "num_kv_heads": heads, "head_dim": dim,
            "dtype": dtype_name(self.lm.dtype), "sink": cfg.sink, "tail": cfg.tail, "block_tokens": cfg.block_tokens,
            "estimator": asdict(cfg.estimator), "index": asdict(cfg.index),
        }
        writer.commit(self.lm.fingerprint(), meta, checksums)


class Document:
    """A prefilled sequence, ready to be continued or questioned."""

    def __init__(
        self, engine: Engine, cache: RCCache, tokens: int, last_logits: torch.Tensor | None, prefill_ms: float,
        store: str | None, scratch: str | None,
    ) -> None:
        self.engine = engine
        self.cache = cache
        self.tokens = tokens
        self.last_logits = last_logits
        self.prefill_ms = prefill_ms
        self.store = store
        self._finalizer = weakref.finalize(self, _cleanup, cache.tier, scratch)

    @property
    def meter(self) -> ByteMeter:
        return self.cache.meter

    def configure(self, method: str | None = None, budget: float | None = None, estimator: EstimatorSpec | None = None) -> None:
        """Change how the next questions attend to this document: the KV, index and anchors are
        reused.  A new ``estimator`` is built once from the tier (see :meth:`RCCache.use_estimator`)."""
        cfg = self.engine.config
        changes = {k: v for k, v in {"method": method, "budget": budget, "estimator": estimator}.items() if v is not None}
        new = replace(cfg, **changes)  # validated by EngineConfig
        if new.estimator != self.cache.config.estimator:
            self.cache.use_estimator(new.estimator)
        self.cache.config = new
        self.engine = Engine(self.engine.lm, new, self.engine.show_progress)

    def drop_caches(self) -> None:
        """Forget cached KV blocks, so that the next question starts cold (disk tier; no-op otherwise)."""
        cache = getattr(self.cache.tier, "cache", None)
        if cache is not None:
            cache.clear()

    @contextlib.contextmanager
    def _scratch_tail(self) -> Iterator[None]:
        """Tokens appended within this block join the tail without spilling and are dropped after."""
        cache = self.cache
        marks = [(st.tail.n, st.seen) for st in cache.state]
        cache.spill_enabled = False
        try:
            yield
        finally:
            for st, (tail_n, seen) in zip(cache.state, marks, strict=True):
                st.tail.n, st.seen = tail_n, seen
            cache.spill_enabled = True

    def ask(self, question: str | list[int], sampling: SamplingConfig | None = None, on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer one question about the document; the document is left as it was."""
        lm = self.engine.lm
        ids = self.engine.tokenize(question, special=False) if isinstance(question, str) else list(question)
        if not ids:
            raise ValueError("the question is empty")
        sampling = sampling or SamplingConfig()
        self.engine._check_length(self.tokens + len(ids), sampling.max_new_tokens)
        first_step = self.meter.next_step()
        with self._scratch_tail(), torch.no_grad():
            t0 = time.perf_counter()
            logits = forward_logits(lm.model, torch.tensor([ids], device=lm.device), self.cache, self.tokens)
            question_ms = 1e3 * (time.perf_counter() - t0)
            out, text, decode_s, steps = self._decode(logits, self.tokens + len(ids), sampling, on_text)
        stats = self._stats(first_step, len(ids) + steps, question_ms=question_ms, decode_s=decode_s, steps=steps)
        return Answer(text, out, self.tokens + len(ids), len(out), stats)

    def logits(self, continuation: str | list[int]) -> torch.Tensor:
        """Teacher-forced next-token logits ``(T, vocab)`` float32 after each of the ``T`` tokens of
        ``continuation`` appended to the document (row t predicts token t + 1).  For scoring answers
        and measuring quality; the document is left as it was."""
        lm = self.engine.lm
        ids = self.engine.tokenize(continuation, special=False) if isinstance(continuation, str) else list(continuation)
        if not ids:
            raise ValueError("the continuation is empty")
        self.engine._check_length(self.tokens + len(ids), 0)
        self.meter.next_step()
        with self._scratch_tail(), torch.no_grad():
            out = forward_logits(lm.model, torch.tensor([ids], device=lm.device), self.cache, self.tokens, every_position=True)
        return out[0]

    def continue_prompt(self, sampling: SamplingConfig | None = None, on_text: Callable[[str], None] | None = None) -> Answer:
        """Continue the prefilled prompt itself (what ``generate`` does); tail tokens spill."""
        if self.last_logits is None:
            raise ValueError("a reopened document has no pending prompt to continue: ask it a question instead")
        sampling = sampling or SamplingConfig()
        first_step = self.meter.step + 1
        with torch.no_grad():
            out, text, decode_s, steps = self._decode(self.last_logits, self.tokens, sampling, on_text)
        self.last_logits = None
        stats = self._stats(first_step, steps, question_ms=0.0, decode_s=decode_s, steps=steps)
        return Answer(text, out, self.tokens, len(out), stats)

    def _decode(
        self, logits: torch.Tensor, position: int, sampling: SamplingConfig, on_text: Callable[[str], None] | None
    ) -> tuple[list[int], str, float, int]:
        lm = self.engine.lm
        eos = lm.eos_token_ids
        gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        out: list[int] = []
        text, emitted, decode_s, steps = "", 0, 0.0, 0
        while True:
            token = sample_next(logits[0], sampling, gen)
            if token in eos and not sampling.ignore_eos:
                break
            out.append(token)
            text = lm.tokenizer.decode(out, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
            if on_text is not None:
                safe = len(text) if cut >= 0 else _safe_prefix(text, sampling.stop)
                if safe > emitted:
                    on_text(text[emitted:safe])
                    emitted = safe
            if cut >= 0 or len(out) >= sampling.max_new_tokens:
                break
            self.meter.next_step()
            t0 = time.perf_counter()
            logits = forward_logits(lm.model, torch.tensor([[token]], device=lm.device), self.cache, position)
            decode_s += time.perf_counter() - t0
            steps += 1
            position += 1
        if on_text is not None and len(text) > emitted:
            on_text(text[emitted:])
        return out, text, decode_s, steps

    def _stats(self, first_step: int, queries: int, question_ms: float, decode_s: float, steps: int) -> dict[str, Any]:
        """Bytes read from meter step ``first_step`` on, by ``queries`` query tokens (question and
        decode steps), per tier, and what they amount to in tokens per KV head and layer."""
        meter, cache = self.meter, self.cache
        by_tier = {}
        for t in meter.tiers(since=first_step):
            c = meter.totals(tier=t, since=first_step)
            by_tier[t] = {"logical": c.logical, "physical": c.physical, "h2d": c.h2d, "disk_read": c.disk_read,
                          "cache_hits": c.cache_hits, "cache_misses": c.cache_misses}
        index_bytes = meter.index_totals(since=first_step).bytes
        # Decode steps alone (one query each; the question's step, if any, is first_step).
        decode_from = first_step + (1 if queries > steps else 0)
        per_step = {}
        for t in meter.tiers(since=decode_from):
            c = meter.totals(tier=t, since=decode_from)
            per_step[t] = {"logical": c.logical / steps if steps else 0.0, "physical": c.physical / steps if steps else 0.0}
        index_per_step = meter.index_totals(since=decode_from).bytes / steps if steps else 0.0
        layers, heads = cache.num_layers, cache.num_kv_heads
        row = cache.tier.layout.row_bytes
        logical = sum(v["logical"] for v in by_tier.values())
        tokens_read = logical / (row * layers * heads * queries) if queries else 0.0
        summary_bytes = cache.summary_bytes_per_head()
        mid = cache.tier.num_rows(0)
        cfg = self.engine.config
        return {
            "method": cfg.method, "offload": cfg.offload, "budget": cfg.budget,
            "retrieved_per_head": retrieval_count(cfg.budget, mid) if cfg.method in ("topk", "rc") else (mid if cfg.method == "dense" else 0),
            "mid_tokens": mid, "queries": queries, "decode_steps": steps,
            "bytes": {"logical": logical, "physical": sum(v["physical"] for v in by_tier.values()), "by_tier": by_tier, "index": index_bytes},
            "bytes_per_query": logical / queries if queries else 0.0,
            "bytes_per_decode_step": {"by_tier": per_step, "index": index_per_step},
            "token_equivalent": {"support": tokens_read, "bytes": tokens_read + summary_bytes / row},
            "timings_ms": {"prefill": self.prefill_ms, "question": question_ms,
                           "decode_per_token": 1e3 * decode_s / steps if steps else None},
        }

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "Document":
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.close()


# Rows of float32 keys per verified block of a persisted flat index (4 MiB at head dim 64).
KEY_BLOCK_ROWS = 16384


def _keys_file(layer: int, head: int) -> str:
    return f"keys-L{layer}-H{head}.f32"


def _safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the prefix of ``text`` that no stop string can still claim."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold


def _cleanup(tier: KVTier, scratch: str | None) -> None:
    tier.close()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)

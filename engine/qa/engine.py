"""The public API: load a model once, prefill a document once, ask it many questions.

    engine = Engine.load("path/to/model", EngineConfig(method="rc", budget=0.02, offload="disk"))
    doc = engine.prefill(text, store="doc.rcs")    # persisted: reopen later with engine.open
    answer = doc.ask("What is the special magic number for ...?")
    print(answer.text, answer.stats["bytes"]["logical"])

A document is one sequence (batch 1).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ...storage import (
    Artifact, ArtifactError, ArtifactWriter, ByteMeter, DiskTier, IndexSpec, KVTier, MemoryTier, TierLayout, device_tier, host_tier,
)
from ...storage.document_store import DocumentReader
from ...storage.manifest import record
from ...storage.rows import dtype_name
from ...storage.object_store import is_remote, remote_errors
from ...storage.space import ensure_room, is_no_room, no_room
from ...storage.temporaries import Scratch, reclaim_stale_scratch
from ..calibration.maps_file import MapsError, read_maps
from ..config import OFFLOADS, EngineConfig
from ..decode.state import KVState
from ..hf.cache import RCCache
from ..hf.integration import prefill_chunk
from ..hf.loader import LoadedModel, load_model
from ..progress import progress
from ..rule.feature_maps import EstimatorSpec
from ..sampling import SamplingConfig
from .batch import Member, decode_group, group_stats
from .document import Answer, Document
from .stats import answer_stats
from .inputs import flag, sampling_config, several, store_path, token_ids
from .persist import persist, restore


# Rows a document's disk tier may grow by (generation spills) that its block cache is sized for.
CACHE_GROWTH = 4096


def resolve_maps(config: EngineConfig, lm: LoadedModel) -> EngineConfig:
    """With the learned estimator: its maps folder made concrete (the maps shipped for a named
    model when none is given) and verified against the loaded model."""
    spec = config.estimator
    if spec.kind != "learned":
        return config
    maps = spec.maps
    if maps is None:
        if lm.maps is None:
            raise MapsError(f"the learned estimator needs maps calibrated for {lm.name}: run `rcengine calibrate --model "
                            f"{lm.path} --out MAPS` and pass --maps MAPS")
        maps = str(lm.maps)
    layers, heads, dim = lm.kv_shape
    cfg = lm.model.config
    read_maps(maps, lm.fingerprint(), (layers, heads, cfg.num_attention_heads // heads, dim))
    return replace(config, estimator=replace(spec, maps=str(Path(maps).resolve())))


class Engine:
    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None, show_progress: bool = True,
                 verify_maps: bool = True, log: Callable[[str], None] | None = None) -> None:
        """``verify_maps``: resolve and verify the learned estimator's maps (not for a reopened
        store's own, which it holds).  ``log``: what the user should know of (a conversion, a wait
        for another writer of a store)."""
        if not isinstance(lm, LoadedModel):
            raise TypeError(f"an Engine takes a LoadedModel (rcengine.load_model), not {type(lm).__name__}: or use Engine.load")
        if config is not None and not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, not {type(config).__name__}")
        self.lm = lm
        config = config if config is not None else EngineConfig()
        self.config = resolve_maps(config, lm) if verify_maps else config
        self.show_progress = show_progress
        self._log = log

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        config: EngineConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        show_progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> "Engine":
        """Load a model (see :func:`load_model`: a folder, a GGUF file or a name; None: the embedded
        default model).  ``log``: one-time work (a GGUF converted on first use) is announced there."""
        return cls(load_model(model, device, dtype, trust_remote_code, log), config, show_progress, log=log)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return list(self.lm.tokenizer(text, add_special_tokens=special)["input_ids"])

    def max_text_bytes(self) -> int:
        """Bytes of text that may still fit the model's positions (at most 4 bytes a character of
        its longest token): a longer text need not be read to be refused."""
        longest = max(map(len, self.lm.tokenizer.get_vocab()), default=1)
        return self.lm.max_positions * 4 * max(longest, 1)

    def with_config(self, config: EngineConfig, verify_maps: bool) -> Engine:
        """An engine over the same loaded model, progress and log, with ``config``."""
        return type(self)(self.lm, config, self.show_progress, verify_maps=verify_maps, log=self._log)

    @property
    def vocab_size(self) -> int:
        return int(self.lm.model.get_input_embeddings().num_embeddings)

    def token_ids(self, value: object, what: str, special: bool = True) -> list[int]:
        """Text or token ids, checked (:func:`inputs.token_ids`) -> ids."""
        return token_ids(value, lambda text: self.tokenize(text, special), self.vocab_size, what)

    def prefill(self, document: str | list[int], store: str | Path | None = None, overwrite: bool = False,
                wait: bool = False) -> Document:
        """Prefill ``document`` (text, or token ids) once.  With ``store`` it is also persisted
        there, to be reopened by :meth:`open` in another process or on another machine.  A store
        replaces only an empty folder or, with ``overwrite``, an rcengine store; another process
        writing it makes this one wait (``wait``) or refuse."""
        store = None if store is None else store_path(store)
        with remote_errors(store) if is_remote(store) else contextlib.nullcontext():
            return self._prefill(document, store, overwrite, wait)

    def _prefill(self, document: str | list[int], store: str | Path | None, overwrite: bool, wait: bool) -> Document:
        ids = self.token_ids(document, "document")
        flag(overwrite, "overwrite")
        flag(wait, "wait")
        if len(ids) >= self.lm.max_positions:
            raise ValueError(f"the document has {len(ids)} tokens; the model handles at most {self.lm.max_positions} positions")
        cfg = self.config
        meter = ByteMeter()
        # Where the KV goes on disk, if anywhere, and about how much it takes: refused before any work if it cannot fit.
        room = (None if is_remote(store) else store) if store is not None \
            else (cfg.scratch_dir or tempfile.gettempdir()) if cfg.offload == "disk" else None
        what = f"the store of {len(ids)} tokens" if store is not None else f"the scratch KV store of {len(ids)} tokens"
        if room is not None:
            ensure_room(room, self._store_bytes(len(ids)), what)
        writer = ArtifactWriter(store, overwrite=overwrite, wait=wait, log=self._log) if store is not None else None
        scratch, tier = None, None
        try:
            if cfg.offload == "disk":
                if writer is not None:
                    location = writer.kv_location
                else:
                    reclaim_stale_scratch(cfg.scratch_dir)  # scratch stores of processes that were killed
                    scratch = Scratch(cfg.scratch_dir)
                    location = f"{scratch.path}/kv.zarr"
                cache_bytes = min(cfg.cache_bytes, DiskTier.blocks_bytes(self._layout(), len(ids) + CACHE_GROWTH, cfg.block_tokens))
                tier = DiskTier.create(location, self._layout(), cfg.block_tokens, cache_bytes, self.lm.device, meter,
                                       durable=writer is not None)
            else:
                tier = self._memory_tier(meter)
            clock = PhaseClock()
            with torch.no_grad():
                cache, last_logits = self._run_prefill(ids, self._state(cfg, tier, meter), clock)
            prefill_ms = sum(clock.ms.values())
            writes = tier.write_stats.as_dict() if isinstance(tier, DiskTier) else {}
            if writer is not None:
                persist(cache.state, ids, writer, self.lm.fingerprint(), dtype_name(self.lm.dtype), lap=clock.lap,
                        model_name=self.lm.name)
                if isinstance(tier, DiskTier):  # read from the committed store from now on
                    tier.close()
                    art = Artifact.open(store)
                    cache.state.tier = DiskTier.open(art.kv_location, cfg.cache_bytes, self.lm.device, meter, art.kv_checksums,
                                                     carry=tier)
                    clock.lap("reopen")
            # Inside the try: until the document owns the tier and scratch store, this function releases them.
            doc = Document(self, cache, len(ids), last_logits, prefill_ms, store=str(store) if store else None, scratch=scratch)
        except BaseException as e:
            if isinstance(tier, DiskTier) and not tier.read_only:
                tier.abandon()  # no writer thread may still be at work in the folders removed below
            if writer is not None:
                writer.abort()
            if scratch is not None:
                scratch.remove()
            if room is not None and is_no_room(e):
                raise no_room(room, self._store_bytes(len(ids)), what) from e
            raise
        doc.prefill_phases_ms = dict(clock.ms)
        doc.prefill_writes = writes
        return doc

    def adopt(self, ids: list[int], keys_values: Sequence[tuple[torch.Tensor, torch.Tensor]], last_logits: torch.Tensor) -> Document:
        """A document from keys and values this model already computed for ``ids`` (for example a
        transformers ``DynamicCache``'s layers): ``(1, Hkv, n, d)`` per layer, post-RoPE, on the
        compute device.  No prefill is run; they are split and offloaded as a prefill's would be."""
        layers, heads, dim = self.lm.kv_shape
        if len(keys_values) != layers or any(k.shape != (1, heads, len(ids), dim) for k, _ in keys_values):
            raise ValueError(f"need {layers} layers of keys and values shaped (1, {heads}, {len(ids)}, {dim})")
        if self.config.offload == "disk":
            raise ValueError("adopt offloads to memory tiers (cpu or device); persist with prefill(store=...)")
        meter = ByteMeter()
        cache = RCCache(self._state(self.config, self._memory_tier(meter), meter))
        for buf, (k, v) in zip(cache.prefill, keys_values, strict=True):
            buf.wrap(k, v)
        with torch.no_grad():
            cache.finalize_prefill()
        return Document(self, cache, len(ids), last_logits, 0.0, store=None, scratch=None)

    def open(self, store: str | Path, offload: str | None = None) -> Document:
        """Reopen a persisted document without recomputing its prefill.  The KV stays in the store
        and is read as needed (``offload`` ``cpu`` or ``device`` copies it into memory instead)."""
        store = store_path(store)
        with remote_errors(store) if is_remote(store) else contextlib.nullcontext():
            return self._open(store, offload)

    def _open(self, store: str | Path, offload: str | None) -> Document:
        if offload not in (None, *OFFLOADS):
            raise ValueError(f"offload {offload!r} is unknown: use one of {', '.join(OFFLOADS)}")
        art = Artifact.open(store, expect_fingerprint=self.lm.fingerprint(), expect_name=self.lm.name)
        reader = DocumentReader(art)
        meta = reader.meta
        layers, heads, dim = self.lm.kv_shape
        if (meta.num_layers, meta.num_kv_heads, meta.head_dim, meta.dtype) != (layers, heads, dim, dtype_name(self.lm.dtype)):
            raise ArtifactError(f"{store} holds a KV layout ({meta.num_layers} layers, {meta.num_kv_heads} KV heads, head dim "
                                f"{meta.head_dim}, {meta.dtype}) the loaded model does not have: re-run the prefill with it")
        ids = reader.doc_ids
        if meta.tokens >= self.lm.max_positions or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ArtifactError(f"{store} holds token ids or a length this model cannot take: re-run the prefill with it")
        cfg = replace(
            self.config, sink=meta.sink, tail=meta.tail, offload=offload or "disk", block_tokens=meta.block_tokens,
            estimator=record(EstimatorSpec, meta.estimator, "estimator", str(store)),
            index=record(IndexSpec, meta.index, "index", str(store)),
        )
        meter = ByteMeter()
        disk = DiskTier.open(art.kv_location, cfg.cache_bytes, self.lm.device, meter, art.kv_checksums, layout=self._layout(),
                             rows=meta.mid_rows)
        try:
            first = min(meta.sink, meta.tokens)
            if disk.block_tokens != meta.block_tokens or any(
                    not np.array_equal(disk.positions(i), np.arange(first, first + meta.mid_rows)) for i in range(layers)):
                raise ArtifactError(f"the KV store of {store} does not match its manifest (blocks or positions): re-run the "
                                    "prefill")
            tier: KVTier = disk
            if cfg.offload != "disk":
                tier = self._memory_tier(meter, cfg.offload)
                for layer in range(layers):
                    n = disk.num_rows(layer)
                    tier.reserve(n)
                    k, v = disk.gather(layer, torch.arange(n).expand(heads, n))
                    tier.append(layer, k.to(self.lm.dtype), v.to(self.lm.dtype), torch.from_numpy(disk.positions(layer)))
                meter.reset()
            state = self._state(cfg, tier, meter)
            streamed = cfg.offload == "disk" and not cfg.keys_in_memory
            restore(state, reader, streamed_keys=streamed)
        except BaseException:
            disk.close()  # what a damaged store refused leaves open
            raise
        if cfg.offload != "disk":
            disk.close()
        engine = Engine(self.lm, cfg, self.show_progress, verify_maps=False, log=self._log)
        return Document(engine, RCCache(state, prefill=False), meta.tokens, None, 0.0, store=str(store), scratch=None, artifact=art)

    def generate(
        self, prompt: str | list[int], sampling: SamplingConfig | None = None, on_text: Callable[[str], None] | None = None,
        store: str | Path | None = None, overwrite: bool = False, wait: bool = False,
    ) -> Answer:
        """Prefill ``prompt`` and continue it.  Tail tokens spill as generation grows.  ``store``,
        ``overwrite``, ``wait``: persist the prefill (see :meth:`prefill`)."""
        ids = self.token_ids(prompt, "prompt")
        sampling = sampling_config(sampling)
        self.check_length(len(ids), sampling.max_new_tokens)
        doc = self.prefill(ids, store=store, overwrite=overwrite, wait=wait)
        try:
            return doc.continue_prompt(sampling, on_text)
        finally:
            doc.close()

    def generate_many(self, prompts: Sequence[str | list[int]], sampling: SamplingConfig | None = None) -> list[Answer]:
        """Prefill several prompts and continue them together: each step is one forward over one
        token per prompt still going (the weights read once for all), each attending to its own
        document.  The same tokens as :meth:`generate` on each (greedy, within float tolerance).
        Each answer's ``stats`` are its own document's; ``stats["batch"]`` the group's."""
        ids = [self.token_ids(p, f"prompt {i + 1}") for i, p in enumerate(several(prompts, "prompts"))]
        sampling = sampling_config(sampling)
        for p in ids:
            self.check_length(len(p), sampling.max_new_tokens)
        with contextlib.ExitStack() as docs:
            members = []
            for p in ids:
                doc = docs.enter_context(self.prefill(p))
                members.append((doc, Member(doc.runner, doc.cache, doc.last_logits, doc.tokens)))
            firsts = [doc.meter.step + 1 for doc, _ in members]
            with torch.no_grad(), progress("prompts", len(ids), "answers", self.show_progress) as advance:
                run = decode_group(self.lm.model, self.lm.tokenizer, self.lm.eos_token_ids, [m for _, m in members], sampling,
                                   advance)
            answers = []
            for i, ((doc, _), stream) in enumerate(zip(members, run.streams)):
                stats = answer_stats(doc.state, doc.meter, firsts[i], run.steps[i], run.steps[i], doc.prefill_ms, 0.0,
                                     run.decode_s_of(i))
                answers.append(Answer(stream.text, stream.tokens, doc.tokens, len(stream.tokens), stats))
        batch = group_stats([a.stats for a in answers], run, sum(a.new_tokens for a in answers))
        for a in answers:
            a.stats["batch"] = batch
        return answers

    def check_length(self, prompt_tokens: int, new_tokens: int) -> None:
        if prompt_tokens + new_tokens > self.lm.max_positions:
            raise ValueError(
                f"{prompt_tokens} prompt tokens + {new_tokens} new tokens exceed the model's {self.lm.max_positions} positions: "
                "shorten the prompt or ask for fewer tokens"
            )

    # -- internals ----------------------------------------------------------------------------

    def _store_bytes(self, tokens: int) -> int:
        """About what a store of ``tokens`` tokens takes on disk: the KV store (every token counted
        as a mid row: the anchors' files take the rest), 2 % and 1 MiB for the other files, and the
        faiss selector's float32 keys files."""
        layers, heads, dim = self.lm.kv_shape
        total = int(1.02 * DiskTier.bytes_for(self._layout(), tokens, self.config.block_tokens)) + (1 << 20)
        if self.config.selector == "faiss":
            total += tokens * layers * heads * dim * 4
        return total

    def _layout(self) -> TierLayout:
        layers, heads, dim = self.lm.kv_shape
        return TierLayout(layers, heads, dim, self.lm.dtype)

    def _memory_tier(self, meter: ByteMeter, offload: str | None = None) -> MemoryTier:
        if (offload or self.config.offload) == "device":
            return device_tier(self._layout(), self.lm.device, meter)
        return host_tier(self._layout(), self.lm.device, meter)

    def _state(self, cfg: EngineConfig, tier: KVTier, meter: ByteMeter) -> KVState:
        layers, heads, dim = self.lm.kv_shape
        index = None
        if cfg.selector == "faiss":
            from ...storage import KeyIndex

            index = KeyIndex(cfg.index, layers, heads, dim, meter)
        return KVState(cfg, layers, heads, dim, self.lm.dtype, self.lm.device, tier, meter, index)

    def _run_prefill(self, ids: list[int], state: KVState, clock: "PhaseClock") -> tuple[RCCache, torch.Tensor]:
        cache = RCCache(state)
        if isinstance(state.tier, DiskTier) and not state.tier.read_only:
            cache.stream_mid(len(ids))  # the store's writes overlap the next chunks' compute
        chunk = self.config.prefill_chunk
        x = torch.tensor(ids, device=self.lm.device)[None]
        with progress("prefill", len(ids), "tokens", self.show_progress) as advance:
            for start in range(0, len(ids), chunk):
                logits = prefill_chunk(self.lm.model, x[:, start : start + chunk], cache, start)
                cache.offload_ready()
                advance(min(chunk, len(ids) - start))
        clock.lap("forward")
        with progress("offloading, selection state and summaries", state.num_layers, "layers", self.show_progress) as advance:
            cache.finalize_prefill(progress=lambda _layer: advance(1))
        clock.lap("finalize")
        if isinstance(state.tier, DiskTier) and not state.tier.read_only:
            state.tier.flush()
            clock.lap("flush")
        return cache, logits


class PhaseClock:
    """Wall time of a prefill's phases, in ms by name (host time: queued device work shows up in
    the phase that first waits for it)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + 1e3 * (now - self._t)
        self._t = now

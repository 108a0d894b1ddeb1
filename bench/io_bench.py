"""``rcengine bench-io``: what each byte read buys (docs/ARCHITECTURE.md, section 2).

Variants (dense, sink-tail, topk and rc with each estimator, at each budget) x offload tiers, on
the task suite's eval split at the chosen lengths; every variant sees the same examples.  For each
example (one task at one length):

1. The context is prefilled once and persisted to a scratch store; the store is opened on every
   tier (``disk`` reads it; ``cpu`` / ``device`` copy it in).  The model's own dense attention
   (transformers, no rcengine) gives the reference logits.
2. On the quality tier (the first memory tier asked for), each variant's teacher-forced logits
   along question + reference answer and along a held-out text window give the answer's
   log-likelihood relative to the reference and KL(reference || variant) at every position.
3. While the engine's ``dense`` variant runs, a probe sees every decode query of every layer:
   each head's normalised attention entropy (float64, the whole context), and at sampled queries
   every variant's attention-output error against dense and (rc) its estimated against true
   residual mass, using the engine's own feature maps and summaries and exact search.
4. On every tier, a greedy answer with a cold block cache: task score (RULER rules), bytes per
   decode step (logical and physical), selection bytes.  Answers on other tiers must equal the
   quality tier's (recorded per row).
5. On the first example of each length, every variant on every tier decodes a fixed number of
   steps from a cold cache, in interleaved rounds: the median ms per decode step is its time.

Aggregation, the trade-off analysis (rho*, break-even bandwidth) and the report files are in
``io_analysis.py`` and ``io_report.py``.
"""

from __future__ import annotations

import platform
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..engine.calibration.maps_file import read_maps
from ..engine.config import EngineConfig
from ..engine.hf.integration import reference_logits
from ..engine.hf.loader import LoadedModel
from ..engine.progress import progress
from ..engine.qa.document import Answer, Document
from ..engine.qa.engine import Engine, resolve_maps
from ..engine.rule.feature_maps import EstimatorSpec
from ..engine.sampling import SamplingConfig
from ..storage.defaults import DEFAULT_BLOCK_TOKENS
from .io_analysis import ENTROPY_BINS, Accumulator, AnswerCost, entropy_bin, summarise
from .io_probe import Probe
from .variants import Variant
from .haystacks import corpus_haystack, eval_documents, noise_haystack
from .tasks import TASKS, TaskGenerator, score

TIERS = ("cpu", "disk", "device")
ESTIMATORS = ("centroid", "learned", "favor")


SELECTORS = ("exact", "exact-block", "block")


@dataclass(frozen=True, slots=True)
class BenchIOConfig:
    """What ``bench-io`` runs.  ``bandwidths``: (name, bytes per second) pairs for the modelled time."""

    lengths: tuple[int, ...] = (4096, 8192, 16384)
    tasks: tuple[str, ...] = TASKS
    examples: int = 2  # per task and length
    budgets: tuple[float, ...] = (0.005, 0.01, 0.02, 0.04)
    estimators: tuple[str, ...] = ESTIMATORS
    selectors: tuple[str, ...] = SELECTORS  # exact first: rho* and the trade-off are computed with it
    # Tokens per unit of the block selector: the store's block, so that on the disk tier it reads
    # exactly what it selects (and every tier selects alike).
    select_block: int = DEFAULT_BLOCK_TOKENS
    tiers: tuple[str, ...] = ("cpu", "disk")
    bandwidths: tuple[tuple[str, float], ...] = (("ssd", 1.9e9), ("pcie", 55e9))
    max_new_tokens: int = 32
    heldout_tokens: int = 32
    probe_queries: int = 4  # sampled queries per continuation for the per-head analysis
    timing_rounds: int = 3  # interleaved rounds of fixed-length decodes, on each length's first example
    timing_tokens: int = 16
    features: int = 64  # centroids of the centroid estimator; the others get as many summary bytes
    maps: str | None = None  # the learned estimator's maps (None: the embedded model's)
    sink: int = 4
    tail: int = 64
    cache_bytes: int = 16 << 20  # disk tier block cache (emptied before every answer)
    seed: int = 0
    workdir: str | None = None  # scratch stores go here (a temporary folder by default)
    # What the needles hide in: "text" (the eval split's documents) or "noise" (RULER's repeated
    # sentences, its niah_single_1 and variable-tracking haystack: a small model that misses needles in
    # prose still finds them there).  Common and frequent words and fact lookup bring their own.
    haystack: str = "text"
    time_limit_s: float | None = None  # start no example after this long; the report says how many ran

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 256 for n in self.lengths):
            raise ValueError(f"lengths must be at least 256 tokens, got {self.lengths}")
        if unknown := [t for t in self.tasks if t not in TASKS]:
            raise ValueError(f"unknown task {unknown[0]!r}: use some of {', '.join(TASKS)}")
        if not self.tasks or self.examples < 1:
            raise ValueError("need at least one task and one example")
        if not self.budgets or any(not 0.0 < b <= 1.0 for b in self.budgets):
            raise ValueError(f"budgets must be fractions in (0, 1] (1 % is 0.01), got {self.budgets}")
        if unknown := [e for e in self.estimators if e not in ESTIMATORS]:
            raise ValueError(f"unknown estimator {unknown[0]!r}: use some of {', '.join(ESTIMATORS)}")
        if not self.selectors or self.selectors[0] != "exact" or (unknown := [s for s in self.selectors if s not in SELECTORS]):
            raise ValueError(f"selectors must start with exact and be some of {', '.join(SELECTORS)}, got {self.selectors}")
        if not self.tiers or (unknown := [t for t in self.tiers if t not in TIERS]):
            raise ValueError(f"tiers must be some of {', '.join(TIERS)}, got {self.tiers}")
        if any(bw <= 0 for _, bw in self.bandwidths):
            raise ValueError("I/O bandwidths must be positive")
        if self.haystack not in ("text", "noise"):
            raise ValueError(f"haystack {self.haystack!r} is unknown: use text or noise")
        if self.timing_rounds < 1 or self.timing_tokens < 2:
            raise ValueError("timing needs at least 1 round of at least 2 tokens")

    @staticmethod
    def quick() -> "BenchIOConfig":
        """Small enough for CI (2 cores, well under 3 minutes): one length, two tasks (a needle
        and a diffuse one), two budgets."""
        return BenchIOConfig(lengths=(2048,), tasks=("niah_single_number", "common_words"), examples=1, budgets=(0.01, 0.04),
                             estimators=("centroid", "learned"),
                             max_new_tokens=12, heldout_tokens=16, probe_queries=2, timing_rounds=2, timing_tokens=8)

    def rc_budgets(self) -> tuple[float, ...]:
        """rc also runs at a half and a quarter of the smallest budget, so that the budget where it
        matches topk's quality (rho* < 1) can be found, not just bounded."""
        low = min(self.budgets)
        return tuple(sorted(set(self.budgets) | {low / 2, low / 4})) if self.estimators else ()

    def variants(self) -> list[Variant]:
        """Dense first (it is the probe's run), then sink-tail, then topk and rc by budget (exact
        selection), then the other selectors at the main budgets."""
        out = [Variant("dense"), Variant("sink-tail")]
        for b in sorted(set(self.budgets) | set(self.rc_budgets())):
            if b in self.budgets:
                out.append(Variant("topk", budget=b))
            if b in self.rc_budgets():
                out += [Variant("rc", e, b) for e in self.estimators]
        for sel in self.selectors[1:]:
            for b in sorted(self.budgets):
                out += [Variant("topk", budget=b, selector=sel), *(Variant("rc", e, b, sel) for e in self.estimators)]
        return out


def equal_bytes_features(kind: str, centroids: int, head_dim: int, directions: int = 0) -> int:
    """Features of estimator ``kind`` whose summary (map state included) costs at most what
    ``centroids`` centroids cost: C (2d + 2) floats per KV head (centroids, S, u and beta)."""
    budget = centroids * (2 * head_dim + 2)
    if kind == "centroid":
        return centroids
    if kind == "learned":  # plus p + 1 spreads per cluster
        return max(1, budget // (2 * head_dim + 2 + directions + 1))
    if kind == "favor":  # S, u and beta only; an even count (antithetic pairs)
        return max(2, budget // (head_dim + 2) // 2 * 2)
    raise ValueError(f"estimator {kind!r} has no summary")


def estimator_specs(lm: LoadedModel, cfg: BenchIOConfig) -> dict[str, EstimatorSpec]:
    """Each compared estimator at equal summary bytes (the learned one's maps resolved and checked)."""
    _, _, head_dim = lm.kv_shape
    specs = {}
    for e in cfg.estimators:
        if e == "learned":
            probe = EngineConfig(estimator=EstimatorSpec("learned", cfg.features, maps=cfg.maps))
            spec = resolve_maps(probe, lm).estimator
            p = read_maps(spec.maps).layers[0].U.shape[-1]
            specs[e] = replace(spec, num_features=equal_bytes_features(e, cfg.features, head_dim, p))
        else:
            specs[e] = EstimatorSpec(e, equal_bytes_features(e, cfg.features, head_dim))
    return specs


def run_bench_io(lm: LoadedModel, cfg: BenchIOConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run everything ``cfg`` asks for with the loaded model; -> the report (JSON-ready dict)."""
    variants = cfg.variants()
    specs = estimator_specs(lm, cfg)
    positions_needed = max(cfg.lengths) + 2 * max(cfg.max_new_tokens, cfg.heldout_tokens) + 64
    if positions_needed > lm.max_positions:
        raise ValueError(f"length {max(cfg.lengths)} leaves no room for answers within the model's {lm.max_positions} positions")
    count = lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    docs = eval_documents()
    gen = TaskGenerator("eval", corpus_haystack(docs) if cfg.haystack == "text" else noise_haystack, count)
    heldout_source = corpus_haystack(docs)
    acc = Accumulator()
    quality_tier = next((t for t in cfg.tiers if t != "disk"), "disk")
    # Seed outermost: a run cut short by the time limit still covers every task and length.
    examples = [(task, length, seed) for seed in range(cfg.examples) for length in cfg.lengths for task in cfg.tasks]
    scratch = Path(tempfile.mkdtemp(prefix="rcengine-bench-io-", dir=cfg.workdir))
    console = Console(stderr=True)
    done = 0
    t_start = time.perf_counter()
    try:
        with progress("bench-io", len(examples) * len(variants), "example x variant", show_progress) as advance:
            for i, (task, length, seed) in enumerate(examples):
                if cfg.time_limit_s is not None and time.perf_counter() - t_start > cfg.time_limit_s:
                    break
                done = i + 1
                ex = gen.example(task, length, cfg.seed * 1000 + seed)
                rng = random.Random(f"heldout/{task}/{length}/{seed}")
                _run_example(lm, cfg, specs, variants, ex, length, heldout_source(rng, cfg.heldout_tokens * 16), scratch / f"ex{i}.rcs",
                             quality_tier, acc, advance, timed=seed == 0 and task == cfg.tasks[0])
                if show_progress and not console.is_terminal:  # a log gets one line per example instead of a bar
                    console.print(f"bench-io: example {i + 1}/{len(examples)} ({task}, {length} tokens) done at "
                                  f"{time.perf_counter() - t_start:.0f} s", highlight=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    meta = {
        "date": date.today().isoformat(),
        "machine": _machine(lm.device),
        "model": lm.name, "model_path": str(lm.path), "model_fingerprint": lm.fingerprint(), "dtype": str(lm.dtype).removeprefix("torch."),
        "kv_shape": dict(zip(("layers", "kv_heads", "head_dim"), lm.kv_shape, strict=True)),
        "row_bytes": 2 * lm.kv_shape[2] * torch.empty(0, dtype=lm.dtype).element_size(),
        "config": asdict(cfg), "estimators": {e: asdict(spec) for e, spec in specs.items()},
        "quality_tier": quality_tier, "reference": "the model's own dense attention (transformers SDPA)",
        "entropy_bins": [list(b) for b in ENTROPY_BINS], "wall_s": round(time.perf_counter() - t_start, 1),
        "examples_run": done, "examples_planned": len(examples),
        "versions": {"torch": torch.__version__, **_versions()},
    }
    return summarise(meta, variants, acc, cfg.bandwidths, cfg.tiers, quality_tier)


def _run_example(lm, cfg, specs, variants, ex, length, heldout_text, store, quality_tier, acc, advance, timed) -> None:  # noqa: ANN001
    ctx = list(lm.tokenizer(ex.context)["input_ids"])
    tok = lambda s: list(lm.tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    question = tok(ex.question)
    reference_answer = tok(" " + ", ".join(ex.answers) + ".")
    heldout = tok(heldout_text)[: cfg.heldout_tokens]
    qa = question + reference_answer
    ref_qa, ref_held = reference_logits(lm.model, ctx, [qa, heldout])

    first = specs[cfg.estimators[0]] if cfg.estimators else EstimatorSpec("centroid", cfg.features)
    base = EngineConfig(method="dense", budget=min(cfg.budgets), sink=cfg.sink, tail=cfg.tail, offload="disk",
                        estimator=first, cache_bytes=cfg.cache_bytes, keys_in_memory=True)
    engine = Engine(lm, base, show_progress=False)
    prefilled = engine.prefill(ctx, store=store)
    docs: dict[str, Document] = {}
    try:
        for tier in cfg.tiers:
            docs[tier] = prefilled if tier == "disk" else engine.open(store, offload=tier)
        qdoc = docs[quality_tier]
        estimators = {e: qdoc.state.estimator_layers(spec) for e, spec in specs.items()}
        mids = [tuple(x.to(torch.float64) for x in qdoc.state.read_mid(layer)) for layer in range(qdoc.state.num_layers)]
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, stop=("\n",))
        answer_rows = slice(len(question) - 1, len(qa) - 1)  # rows predicting the answer's tokens
        base_answers: dict[str, str] = {}
        ent_qa: dict[int, float] = {}
        ent_held: dict[int, float] = {}
        for v in variants:
            spec = specs.get(v.estimator) if v.estimator else None
            for doc in docs.values():
                doc.configure(method=v.method, budget=v.budget, estimator=spec, selector=v.selector, select_block=cfg.select_block)
            # Quality, on the quality tier; under dense (the first variant) the probe sees every query.
            logits = []
            # Probed queries: the question's last token and the answer's; spread over the held-out window.
            for cont, first_probed, entropies in ((qa, len(question) - 1, ent_qa), (heldout, 0, ent_held)):
                probe = None
                if v.method == "dense":
                    probe = Probe(variants, mids, estimators, _sample_positions(first_probed, len(cont) - 1, cfg.probe_queries), acc,
                                  cfg.select_block)
                    qdoc.state.probe = probe
                try:
                    logits.append(qdoc.logits(cont))
                finally:
                    qdoc.state.probe = None
                if probe is not None:  # mean entropy over layers and heads, per position
                    entropies.update({t: sum(h) / len(h) for t, h in probe.entropy_by_position.items()})
            kl_qa = _kl(ref_qa, logits[0])[answer_rows]
            kl_held = _kl(ref_held, logits[1])
            ll = _loglik(logits[0][answer_rows], reference_answer) - _loglik(ref_qa[answer_rows], reference_answer)
            bins = [entropy_bin(ent_qa[t]) for t in range(answer_rows.start, answer_rows.stop)] + \
                   [entropy_bin(ent_held[t]) for t in range(len(heldout))]
            example_bin = entropy_bin(sum(ent_qa[t] for t in range(answer_rows.start, answer_rows.stop)) / len(reference_answer))
            acc.add_quality(v.key, ex.task, length, kl_qa.tolist(), kl_held.tolist(), ll, len(reference_answer), bins)
            # Cost, on every tier, quality tier first: a greedy answer from a cold cache.
            for tier in sorted(docs, key=lambda t: t != quality_tier):
                doc = docs[tier]
                doc.drop_caches()
                answer = doc.ask(question, sampling)
                if tier == quality_tier:
                    base_answers[v.key] = answer.text
                answer.stats["matches"] = answer.text == base_answers[v.key]
                acc.add_answer(v.key, tier, ex.task, length, _cost(doc, answer, ex), example_bin, tier == quality_tier)
            advance(1)
        if timed:
            _time_decoding(cfg, variants, docs, specs, question, length, acc)
    finally:
        for doc in docs.values():
            doc.close()
        if "disk" not in docs:
            prefilled.close()


def _time_decoding(cfg, variants, docs, specs, question, length, acc) -> None:  # noqa: ANN001
    """ms per decode step of every variant on every tier, side by side: ``timing_rounds``
    interleaved rounds, each decoding ``timing_tokens`` steps (end of sequence ignored) from a cold
    block cache; the median goes in the report."""
    sampling = SamplingConfig(max_new_tokens=cfg.timing_tokens, ignore_eos=True)
    for _ in range(cfg.timing_rounds):
        for v in variants:
            for tier, doc in docs.items():
                doc.configure(method=v.method, budget=v.budget, estimator=specs.get(v.estimator) if v.estimator else None,
                              selector=v.selector, select_block=cfg.select_block)
                doc.drop_caches()
                answer = doc.ask(question[-1:], sampling)  # one token starts it: the steps are what is timed
                acc.timings[v.key, tier, length].append(answer.stats["timings_ms"]["decode_per_token"])


def _sample_positions(start: int, stop: int, count: int) -> set[int]:
    """``count`` positions evenly spread over [start, stop] (inclusive)."""
    if count <= 0 or stop < start:
        return set()
    if count == 1:
        return {start}
    return {round(start + (stop - start) * i / (count - 1)) for i in range(count)}


def _kl(ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || variant) per row, in nats, computed in float64."""
    lr = torch.log_softmax(ref.double(), dim=-1)
    lv = torch.log_softmax(logits.double(), dim=-1)
    return (lr.exp() * (lr - lv)).sum(dim=-1).clamp_min(0.0)


def _loglik(logits: torch.Tensor, tokens: list[int]) -> float:
    lp = torch.log_softmax(logits.double(), dim=-1)
    return float(lp[torch.arange(len(tokens)), torch.tensor(tokens)].sum())


def _cost(doc: Document, answer: Answer, ex) -> AnswerCost:  # noqa: ANN001
    s = answer.stats
    steps = s["decode_steps"]
    per_step = s["bytes_per_decode_step"]
    logical = sum(t["logical"] for t in per_step["by_tier"].values())
    state = doc.state
    row = state.tier.layout.row_bytes
    summary_bytes = state.summary_bytes_per_head() if state.config.method == "rc" else 0
    return AnswerCost(
        score=score(answer.text, ex.answers, ex.task), steps=steps, logical=logical,
        physical=sum(t["physical"] for t in per_step["by_tier"].values()), index=per_step["index"],
        ms=s["timings_ms"]["decode_per_token"], tokens_read=logical / (row * state.num_layers * state.num_kv_heads),
        summary_tokens=summary_bytes / row, mid_tokens=s["mid_tokens"], matches_quality_tier=s["matches"],
    )


def _machine(device: torch.device) -> str:
    import os

    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{platform.node()} ({os.cpu_count()} CPU cores{gpu})"


def _versions() -> dict[str, str]:
    import transformers

    return {"transformers": transformers.__version__, "python": platform.python_version()}

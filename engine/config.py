"""One typed configuration for the engine: method, budget, anchors, estimator, selector, offload."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ..storage import DEFAULT_BLOCK_TOKENS, DEFAULT_CACHE_BYTES, IndexSpec
from .rule.feature_maps import EstimatorSpec
from .rule.methods import METHODS, Method

Offload = Literal["device", "cpu", "disk"]
Selector = Literal["exact", "exact-block", "block", "faiss"]
SELECTORS: tuple[str, ...] = ("exact", "exact-block", "block", "faiss")
# The block selector's unit off the disk tier: Quest's page size (16-token pages selected 7.7
# ms/token at 128K, bench/RESULTS.md).
MEMORY_SELECT_BLOCK = 16
OFFLOADS: tuple[str, ...] = ("device", "cpu", "disk")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How a document is held and attended.

    - ``method``: ``dense`` (every mid token read from the tier each step: the read-everything
      baseline), ``sink-tail`` (anchors only), ``topk`` (anchors + Top-K), ``rc`` (Top-K +
      completion).
    - ``budget``: retrieved tokens as a fraction of the mid-region, in (0, 1].
    - ``sink`` / ``tail``: anchor tokens kept on the device at the start / end of the prompt;
      generated tokens join the tail, which spills its oldest ``spill`` tokens to the tier, the
      index and the summary once it holds ``tail + spill``.
    - ``offload``: where the mid-region lives: ``device``, ``cpu`` (host memory) or ``disk`` (Zarr;
      in the document's store when it is persisted, else in a scratch folder made in
      ``scratch_dir``, the system's temporary folder if None, and removed with the document).
    - ``selector``: how topk and rc choose the mid tokens they read: ``exact`` (scores against a
      copy of every mid key on the compute device: the oracle Top-K), ``exact-block`` (the same
      scores, whole blocks of ``select_block`` tokens ranked by their best token's), ``block`` (whole blocks of
      ``select_block`` tokens, ranked by per-block key bounds held on the device; a sixteenth of
      the KV's size at 16 tokens), ``faiss`` (a FAISS index per KV head on the host, of kind
      ``index``).  Exact is the default on every tier: on the embedded model, at equal bytes
      moved from disk, token-level selection buys as much quality as ``exact-block`` and far more
      than ``block`` (bench/RESULTS.md); block units bound a step's disk reads by what it attends.
    - ``select_block``: tokens per unit of the block selectors; None (the default) is the store's
      block (``block_tokens``) on the disk tier, so that what is read is what was selected, and
      16 in memory.  The budget counts whole units.
    - ``keys_in_memory``: with the faiss selector, for a document reopened on the disk tier, load the
      flat index's keys into memory (faster selection; memory grows with the document).  By default
      they stay in the store and each search reads them block by block.
    - ``graphs``: on CUDA, capture each single-token decode step as a CUDA graph and replay it
      (needs a device selector and a tier the GPU reads directly; other steps run eagerly).
    - ``fused``: on CUDA, compute the rule with two Triton kernels per layer that read the
      retrieved rows in place (device selectors, a tier the GPU reads directly, the centroid
      estimator or none); otherwise, and where those do not hold, with PyTorch operations.
    """

    method: Method = "rc"
    budget: float = 0.02
    sink: int = 4
    tail: int = 64
    spill: int = 32
    estimator: EstimatorSpec = field(default_factory=lambda: EstimatorSpec("centroid", num_features=64))
    index: IndexSpec = field(default_factory=IndexSpec)
    offload: Offload = "cpu"
    scratch_dir: str | None = None
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    cache_bytes: int = DEFAULT_CACHE_BYTES
    prefill_chunk: int = 1024
    selector: Selector = "exact"
    select_block: int | None = None
    keys_in_memory: bool = False
    graphs: bool = True
    fused: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown: use one of {', '.join(METHODS)}")
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload {self.offload!r} is unknown: use one of {', '.join(OFFLOADS)}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget}")
        if self.sink < 0 or self.tail < 1 or self.spill < 1:
            raise ValueError(f"need sink >= 0, tail >= 1 and spill >= 1, got {self.sink}, {self.tail}, {self.spill}")
        if self.prefill_chunk < 1 or self.block_tokens < 1 or self.cache_bytes < 0 or (self.select_block or 1) < 1:
            raise ValueError("prefill_chunk, block_tokens and select_block must be >= 1 and cache_bytes >= 0")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector {self.selector!r} is unknown: use one of {', '.join(SELECTORS)}")
        if self.method == "rc" and self.estimator.kind == "none":
            raise ValueError("method 'rc' needs an estimator (centroid, learned or favor); use method 'topk' for none")

    def resolved(self) -> "EngineConfig":
        """This configuration with ``select_block`` made concrete for its offload."""
        if self.select_block is not None:
            return self
        return replace(self, select_block=self.block_tokens if self.offload == "disk" else MEMORY_SELECT_BLOCK)

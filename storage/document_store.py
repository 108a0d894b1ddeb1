"""The persisted form of a prefilled document, on top of an artifact (``artifact.py``)::

    kv.zarr/                 the mid-region rows (the disk tier's store)
    anchors.safetensors      doc_ids; per layer i: L{i}.sink_k, L{i}.sink_v, L{i}.tail_k,
                             L{i}.tail_v (1, Hkv, n, d) and L{i}.tail_pos (n,)
    summaries.safetensors    per layer i: L{i}.map.<name> (the feature map's tensors) and
                             L{i}.summary.<name> (S, u, beta, v_max, count), float32
    selection.safetensors    the selection state a reopened document loads instead of reading keys:
                             per layer i, L{i}.kmax and L{i}.kmin (Hkv, blocks, d), the block
                             selector's bounds in the model's dtype, and L{i}.clusters (Hkv, n)
                             int32, the centroid of every mid row (where the fused kernels use it);
                             any other selection state is rebuilt from kv.zarr's keys at open
    keys-L{i}-H{h}.f32       (faiss selector only) the mid keys of one KV head as float32 rows,
                             checksummed in blocks of KEY_BLOCK_ROWS rows, for the flat index
    index-L{i}-H{h}.bin      a serialised FAISS index (index kinds ivf and hnsw)
    manifest.json            format, model fingerprint, :class:`DocumentMeta`, every checksum

It knows tensor names and files, not models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from .artifact import Artifact, ArtifactWriter
from .block_reader import BlockReader
from .errors import ArtifactError
from .manifest import record
from .rows import DTYPES_BY_NAME

# Rows of float32 keys per verified block of a keys file (4 MiB at head dim 64).
KEY_BLOCK_ROWS = 16384
# Bounds on what a manifest may claim (far above any real model or document; they keep an edited
# manifest from sizing allocations).
MAX_TOKENS = 1 << 32
MAX_COUNT = 1 << 12


def keys_file(layer: int, head: int) -> str:
    return f"keys-L{layer}-H{head}.f32"


def index_file(layer: int, head: int) -> str:
    return f"index-L{layer}-H{head}.bin"


@dataclass(frozen=True, slots=True)
class DocumentMeta:
    """What a persisted document is: its size, KV layout, anchors and how its state was built."""

    tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    sink: int
    tail: int
    block_tokens: int
    estimator: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)
    # {"selector": ..., "block": tokens per selected unit} at prefill (empty in stores made before
    # it existed); selection.safetensors holds what was saved
    selection: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.tokens < MAX_TOKENS or not 0 <= self.sink < MAX_TOKENS or not 1 <= self.tail < MAX_TOKENS:
            raise ValueError(f"tokens {self.tokens}, sink {self.sink} or tail {self.tail} out of range")
        if not (0 < self.num_layers <= MAX_COUNT and 0 < self.num_kv_heads <= MAX_COUNT and 0 < self.head_dim <= MAX_COUNT
                and 0 < self.block_tokens <= MAX_TOKENS):
            raise ValueError("a layout size is out of range")
        if self.dtype not in DTYPES_BY_NAME:
            raise ValueError(f"dtype {self.dtype!r} is unknown")

    @property
    def mid_rows(self) -> int:
        """Rows of the mid-region per layer: past the sink, before the tail (as a prefill splits)."""
        sink = min(self.sink, self.tokens)
        return self.tokens - sink - min(self.tail, self.tokens - sink)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(meta: dict[str, Any], location: str = "the store") -> "DocumentMeta":
        """Checked: every field present (but those with defaults) with its type and range."""
        missing = {f.name for f in fields(DocumentMeta)} - set(meta if isinstance(meta, dict) else {}) - {"estimator", "index", "selection"}
        if missing:
            raise ArtifactError(f"the manifest of {location} lacks {', '.join(sorted(missing))}: it was not made by rcengine "
                                "prefill; re-run the prefill")
        return record(DocumentMeta, meta, "meta", location)


class DocumentWriter:
    """Collects a document's parts into an :class:`ArtifactWriter`; :meth:`commit` makes it visible."""

    def __init__(self, writer: ArtifactWriter) -> None:
        self.writer = writer
        self._anchors: dict[str, torch.Tensor] = {}
        self._summaries: dict[str, torch.Tensor] = {}
        self._selection: dict[str, torch.Tensor] = {}

    def put_anchors(self, layer: int, sink_k: torch.Tensor, sink_v: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
                    tail_pos: torch.Tensor) -> None:
        p = f"L{layer}."
        self._anchors.update({p + "sink_k": sink_k, p + "sink_v": sink_v, p + "tail_k": tail_k, p + "tail_v": tail_v,
                              p + "tail_pos": tail_pos})

    def put_estimator(self, layer: int, map_tensors: dict[str, torch.Tensor], summary: dict[str, torch.Tensor]) -> None:
        p = f"L{layer}."
        self._summaries.update({p + "map." + k: v for k, v in map_tensors.items()})
        self._summaries.update({p + "summary." + k: v for k, v in summary.items()})

    def put_selection(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """``kmax, kmin: (Hkv, blocks, d)`` and/or ``clusters: (Hkv, n)`` of one layer."""
        self._selection.update({f"L{layer}.{k}": v for k, v in tensors.items()})

    def put_keys(self, layer: int, head: int, keys: np.ndarray) -> None:
        """``keys: (n, d)`` float32."""
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        self.writer.put_bytes(keys_file(layer, head), keys.tobytes(), block_bytes=KEY_BLOCK_ROWS * keys.shape[1] * 4)

    def put_index(self, layer: int, head: int, data: bytes) -> None:
        self.writer.put_bytes(index_file(layer, head), data)

    def commit(self, doc_ids: list[int], meta: DocumentMeta, fingerprint: dict[str, Any], kv_checksums: dict[str, str],
               lap: Callable[[str], None] | None = None, model_name: str = "") -> None:
        """Write the tensors' files, then commit the artifact; ``lap(name)`` after each part (timing)."""
        self.writer.put_tensors("anchors", {"doc_ids": torch.tensor(doc_ids, dtype=torch.int64), **self._anchors})
        self.writer.put_tensors("summaries", self._summaries)
        if self._selection:
            self.writer.put_tensors("selection", self._selection)
        if lap is not None:
            lap("commit: tensor files")
        self.writer.commit(fingerprint, meta.as_dict(), kv_checksums, lap=lap, model_name=model_name)


class DocumentReader:
    """The parts of a persisted document, each verified as it is read."""

    def __init__(self, art: Artifact) -> None:
        self.art = art
        self.meta = DocumentMeta.from_dict(art.meta, art.location)
        self._anchors = art.read_tensors("anchors")
        self._summaries = art.read_tensors("summaries")
        self._selection: dict[str, torch.Tensor] | None = None
        self._check_anchors()

    @property
    def doc_ids(self) -> torch.Tensor:
        """``(tokens,)`` int64: the document's token ids."""
        return self._anchors["doc_ids"]

    def _check_anchors(self) -> None:
        """The anchors agree with the manifest: the token count, the sink and tail as a prefill of
        that many tokens splits them, the layout and dtype, every layer present."""
        m = self.meta
        sink = min(m.sink, m.tokens)
        tail = m.tokens - sink - m.mid_rows
        dtype = DTYPES_BY_NAME[m.dtype]
        expected = {"doc_ids": ((m.tokens,), torch.int64)}
        for layer in range(m.num_layers):
            for name, n in (("sink", sink), ("tail", tail)):
                for kv in "kv":
                    expected[f"L{layer}.{name}_{kv}"] = ((1, m.num_kv_heads, n, m.head_dim), dtype)
            expected[f"L{layer}.tail_pos"] = ((tail,), torch.int64)
        got = {k: (tuple(v.shape), v.dtype) for k, v in self._anchors.items()}
        for name, want in expected.items():
            if got.get(name) != want:
                raise ArtifactError(f"the anchors of {self.art.location} do not match its manifest ({name}: "
                                    f"{got.get(name, 'missing')}, expected {want}): re-run the prefill")
        if set(got) != set(expected):
            raise ArtifactError(f"the anchors of {self.art.location} hold other layers than its manifest says: re-run the prefill")
        positions = torch.arange(m.tokens - tail, m.tokens)
        if any(not torch.equal(self._anchors[f"L{i}.tail_pos"], positions) for i in range(m.num_layers)):
            raise ArtifactError(f"the tail positions of {self.art.location} do not match its token count: re-run the prefill")

    def anchors(self, layer: int) -> dict[str, torch.Tensor]:
        """``sink_k, sink_v, tail_k, tail_v, tail_pos`` of one layer."""
        p = f"L{layer}."
        return {k.removeprefix(p): v for k, v in self._anchors.items() if k.startswith(p)}

    def estimator(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The feature map's tensors and the summary's of one layer."""
        m, s = f"L{layer}.map.", f"L{layer}.summary."
        return ({k.removeprefix(m): v for k, v in self._summaries.items() if k.startswith(m)},
                {k.removeprefix(s): v for k, v in self._summaries.items() if k.startswith(s)})

    def selection(self, layer: int) -> dict[str, torch.Tensor]:
        """One layer's saved selection state (empty if none was saved); the file is read and
        verified once, on first use."""
        if self._selection is None:
            self._selection = self.art.read_tensors("selection") if self.art.has("selection.safetensors") else {}
        p = f"L{layer}."
        return {k.removeprefix(p): v for k, v in self._selection.items() if k.startswith(p)}

    def has_keys(self) -> bool:
        return self.art.has(keys_file(0, 0))

    def keys(self, layer: int, head: int) -> np.ndarray:
        """``(n, d)`` float32 mid keys of one KV head (read and verified whole)."""
        return np.frombuffer(self.art.read_bytes(keys_file(layer, head)), dtype=np.float32).reshape(-1, self.meta.head_dim)

    def keys_blocks(self, layer: int, head: int) -> BlockReader:
        """The same keys, to be read block by block (each block verified)."""
        return self.art.block_reader(keys_file(layer, head))

    def index(self, layer: int, head: int) -> bytes:
        return self.art.read_bytes(index_file(layer, head))

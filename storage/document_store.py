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

from .artifact import Artifact, ArtifactWriter, BlockReader

# Rows of float32 keys per verified block of a keys file (4 MiB at head dim 64).
KEY_BLOCK_ROWS = 16384


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(meta: dict[str, Any]) -> "DocumentMeta":
        names = {f.name for f in fields(DocumentMeta)}
        missing = names - set(meta) - {"estimator", "index", "selection"}
        if missing:
            raise ValueError(f"the store's manifest lacks {', '.join(sorted(missing))}: it was not made by rcengine prefill")
        return DocumentMeta(**{k: v for k, v in meta.items() if k in names})


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
               lap: Callable[[str], None] | None = None) -> None:
        """Write the tensors' files, then commit the artifact; ``lap(name)`` after each part (timing)."""
        self.writer.put_tensors("anchors", {"doc_ids": torch.tensor(doc_ids, dtype=torch.int64), **self._anchors})
        self.writer.put_tensors("summaries", self._summaries)
        if self._selection:
            self.writer.put_tensors("selection", self._selection)
        if lap is not None:
            lap("commit: tensor files")
        self.writer.commit(fingerprint, meta.as_dict(), kv_checksums, lap=lap)


class DocumentReader:
    """The parts of a persisted document, each verified as it is read."""

    def __init__(self, art: Artifact) -> None:
        self.art = art
        self.meta = DocumentMeta.from_dict(art.meta)
        self._anchors = art.read_tensors("anchors")
        self._summaries = art.read_tensors("summaries")
        self._selection: dict[str, torch.Tensor] | None = None

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

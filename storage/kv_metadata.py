"""A KV store's metadata (the root group's attributes, each layer's arrays), checked before the
disk tier reads or allocates anything by it: types, ranges, every array's shape, dtype and chunks
against the attributes, and, where the caller knows them, the layout and the rows per layer (an
artifact's manifest and the model say what the store must hold)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .defaults import POSITION_CHUNK
from .errors import ArtifactError
from .rows import DTYPES_BY_NAME, raw_numpy_dtype
from .tier import TierLayout

FORMAT = "rcengine-kv"
READS_VERSIONS = (1, 2)
# Far above any real model or document: bounds that keep edited metadata from sizing allocations.
MAX_COUNT = 1 << 12
MAX_ROWS = 1 << 32


def _little_endian(serializer) -> bool:  # noqa: ANN001 (a zarr BytesCodec)
    """Whether chunks are plain little-endian bytes (the codec's ``endian`` is an enum before zarr
    3.2 and a string after)."""
    endian = getattr(serializer, "endian", None)
    return type(serializer).__name__ == "BytesCodec" and getattr(endian, "value", endian) == "little"


@dataclass(frozen=True, slots=True)
class KVMetadata:
    layout: TierLayout
    block_tokens: int
    chunk_tokens: int
    chunk_heads: int
    rows: tuple[int, ...]  # per layer


def checked_metadata(group, location: str, layout: TierLayout | None = None,  # noqa: ANN001 (a zarr Group)
                     rows: int | None = None) -> KVMetadata:
    """The store's metadata, or one :class:`ArtifactError` saying what does not hold."""
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"the KV store {location} is malformed ({what}): re-create it (rcengine prefill) or restore it from "
                             "a copy")

    try:
        attrs = dict(group.attrs.asdict())
    except Exception as e:  # noqa: BLE001 (zarr raises many types for metadata it cannot parse)
        raise bad(f"its attributes do not read: {type(e).__name__}") from None
    if attrs.get("format") != FORMAT:
        raise ArtifactError(f"{location} is not an rcengine KV store (format {str(attrs.get('format'))[:40]!r})")
    if attrs.get("version") not in READS_VERSIONS:
        raise ArtifactError(f"KV store {location} has format version {str(attrs.get('version'))[:20]}, this rcengine reads "
                            f"{', '.join(map(str, READS_VERSIONS))}: re-run the prefill")
    b = attrs.get("block_tokens")
    ints = {"num_layers": MAX_COUNT, "num_kv_heads": MAX_COUNT, "head_dim": MAX_COUNT, "block_tokens": MAX_ROWS,
            "chunk_tokens": MAX_ROWS, "chunk_heads": MAX_COUNT}
    values = {k: attrs.get(k, {"chunk_tokens": b, "chunk_heads": 1}.get(k)) for k in ints}  # version 1: a chunk per block and head
    for k, top in ints.items():
        v = values[k]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= top:
            raise bad(f"{k} = {str(v)[:20]}")
    if attrs.get("dtype") not in DTYPES_BY_NAME:
        raise bad(f"dtype = {str(attrs.get('dtype'))[:20]}")
    found = TierLayout(values["num_layers"], values["num_kv_heads"], values["head_dim"], DTYPES_BY_NAME[attrs["dtype"]])
    ct, ch = values["chunk_tokens"], values["chunk_heads"]
    if ct % b or ch not in (1, found.num_kv_heads):
        raise bad(f"chunks of {ct} tokens and {ch} heads for blocks of {b} tokens")
    if layout is not None and found != layout:
        raise ArtifactError(f"the KV store {location} holds {found}, not the {layout} its manifest and the model say: re-run "
                            "the prefill")
    raw = raw_numpy_dtype(found.dtype)
    per_layer = []
    for i in range(found.num_layers):
        try:
            arr, pos = group[f"L{i}"], group[f"P{i}"]
            n = arr.attrs.get("rows")
            shapes = (tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype), tuple(pos.shape), tuple(pos.chunks),
                      np.dtype(pos.dtype))
            plain = all(not tuple(x.compressors) and not tuple(x.filters) and _little_endian(x.serializer) for x in (arr, pos))
        except Exception as e:  # noqa: BLE001 (a missing or unparsable array: zarr's KeyError, ValueError, ...)
            raise bad(f"layer {i}'s arrays do not read: {type(e).__name__}") from None
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_ROWS:
            raise bad(f"rows of layer {i} = {str(n)[:20]}")
        want = ((found.num_kv_heads, n, 2, found.head_dim), (ch, ct, 2, found.head_dim), raw, (n,), (POSITION_CHUNK,),
                np.dtype(np.int64))
        if shapes != want:
            raise bad(f"layer {i}'s arrays are {shapes}, expected {want}")
        if not plain:
            raise bad(f"layer {i}'s arrays are not stored as plain little-endian bytes")
        if rows is not None and n != rows:
            raise ArtifactError(f"the KV store {location} holds {n} rows in layer {i}, not the {rows} its manifest says: the "
                                "store was altered; re-run the prefill")
        per_layer.append(n)
    return KVMetadata(found, b, ct, ch, tuple(per_layer))

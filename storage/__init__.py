"""Storage: tiers for the offloaded mid-region KV, the byte meter, key indexes and persisted
prefills.  Knows nothing of models.

The disk tier (zarr) and the key index (faiss) are imported when first used, so that importing
rcengine stays light."""

from typing import TYPE_CHECKING

from .artifact import Artifact, ArtifactWriter, fingerprint_digest
from .block_reader import BlockReader
from .errors import ArtifactError, ModelMismatchError, NotAStoreError, StoreBusyError, StoreReplacedError
from .object_store import ObjectStoreError
from .availability import TierAvailability, available_tiers
from .block_pool import BlockPool, BlockPoolFull
from .checksums import CorruptChunkError
from .defaults import DEFAULT_BLOCK_TOKENS, DEFAULT_CACHE_BYTES
from .index_spec import IndexSpec
from .meter import ByteMeter, Counters
from .space import NoSpaceError
from .remote_publish import store_temporaries as temporaries
from .temporaries import Scratch, Temporary, reclaim_stale, reclaim_stale_scratch, stale_scratch
from .tier import KVTier, MemoryTier, TierLayout, device_tier, host_tier

if TYPE_CHECKING:
    from .disk_tier import DiskTier
    from .key_index import KeyIndex, StreamedFlatIndex, merge_group

_LAZY = {"DiskTier": "disk_tier", "KeyIndex": "key_index", "StreamedFlatIndex": "key_index", "merge_group": "key_index"}


def __getattr__(name: str):  # noqa: ANN202 (PEP 562: the heavy modules load on first use)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_BLOCK_TOKENS", "DEFAULT_CACHE_BYTES", "Artifact", "ArtifactError", "ArtifactWriter", "BlockReader", "BlockPool", "BlockPoolFull",
    "ByteMeter", "CorruptChunkError", "Counters", "DiskTier", "IndexSpec", "KVTier", "KeyIndex", "MemoryTier", "StreamedFlatIndex",
    "ModelMismatchError", "NoSpaceError", "ObjectStoreError", "NotAStoreError", "Scratch", "StoreBusyError", "StoreReplacedError", "Temporary", "TierAvailability", "TierLayout", "available_tiers", "device_tier", "fingerprint_digest", "host_tier",
    "merge_group", "reclaim_stale", "reclaim_stale_scratch", "stale_scratch", "temporaries",
]

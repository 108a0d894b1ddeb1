"""Storage: tiers for the offloaded mid-region KV, the byte meter, key indexes and persisted
prefills.  Knows nothing of models."""

from .artifact import Artifact, ArtifactError, ArtifactWriter, BlockReader, ModelMismatchError, fingerprint_digest
from .availability import TierAvailability, available_tiers
from .block_cache import BlockCache
from .checked_store import CorruptChunkError
from .disk_tier import DiskTier
from .key_index import IndexSpec, KeyIndex, StreamedFlatIndex, merge_group
from .meter import ByteMeter, Counters
from .tier import KVTier, MemoryTier, TierLayout, device_tier, host_tier

__all__ = [
    "Artifact", "ArtifactError", "ArtifactWriter", "BlockReader", "BlockCache", "ByteMeter", "CorruptChunkError", "Counters",
    "DiskTier", "IndexSpec", "KVTier", "KeyIndex", "MemoryTier", "StreamedFlatIndex", "ModelMismatchError", "TierAvailability",
    "TierLayout", "available_tiers", "device_tier", "fingerprint_digest", "host_tier", "merge_group",
]

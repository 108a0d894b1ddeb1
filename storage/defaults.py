"""Defaults of the disk tier, in a module that imports nothing heavy (the engine's config uses them)."""

# 64 tokens a block: within 12 % of the fastest (16) with a warm block cache at 4x fewer files;
# bench/RESULTS.md (disk layout) has the sizes measured against each other.
DEFAULT_BLOCK_TOKENS = 64
# Blocks of every KV head per chunk file (1,024 tokens at 64 a block): creating files, not writing
# bytes, bounded a prefill to disk with one file per block and head (bench/RESULTS.md).
DEFAULT_CHUNK_BLOCKS = 16
# The disk tier's block cache (host memory the GPU reads in place): 512 MiB holds the blocks of a
# 128K-token 8B-shaped step at 1 % (5,376 blocks of 32 KiB, 176 MB) about three times over.
DEFAULT_CACHE_BYTES = 512 << 20
# Bytes of chunk files a prefill to disk may have queued for its background writers: past this the
# prefill waits for the oldest write (pinned staging memory stays bounded; writes overlap compute).
WRITE_BACKLOG_BYTES = 1 << 30
# Positions (int64) per chunk file of a layer's positions array.
POSITION_CHUNK = 16384

"""Decoding with the KV off the compute device: per-layer attention under the configured method."""

"""Storage: tiers for the offloaded mid-region KV, the byte meter, key indexes and persisted
prefills.  Knows nothing of models."""

from .availability import TierAvailability, available_tiers

__all__ = ["TierAvailability", "available_tiers"]

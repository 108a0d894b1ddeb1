"""Which storage tiers this machine can offer, without building any."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TierAvailability:
    name: str
    available: bool
    detail: str


def available_tiers() -> list[TierAvailability]:
    """The host tier (pinned and read zero-copy when CUDA and cupy are present) and the disk tier
    (a Zarr store, when zarr imports)."""
    cuda = torch.cuda.is_available()
    cupy = importlib.util.find_spec("cupy") is not None
    if cuda and cupy:
        host = "pinned host memory, read zero-copy by the GPU"
    elif cuda:
        host = "pinned host memory, copied to the GPU (install cupy for zero-copy reads)"
    else:
        host = "ordinary host memory (no CUDA)"
    zarr = importlib.util.find_spec("zarr") is not None
    return [
        TierAvailability("cpu", True, host),
        TierAvailability("disk", zarr, "Zarr v3 store" if zarr else "zarr is not installed"),
    ]

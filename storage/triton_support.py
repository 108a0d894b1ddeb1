"""Triton where it is: the module (None without it) and whether kernels can run for a device.

Triton ships with CUDA builds of torch; the CPU path never needs it.  Its interpreter
(``TRITON_INTERPRET=1``) runs the kernels on CPU tensors, for tests.  Shared by the storage's
checksum kernel and the engine's attention kernels.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None


def available(device: torch.device) -> bool:
    """Whether Triton kernels can run for tensors on ``device`` (CUDA with Triton, or Triton's CPU
    interpreter when ``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")

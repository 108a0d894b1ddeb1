"""The linear part of CRC-32C of equal-length blocks as one Triton kernel (see device_checksums.py).

:meth:`DeviceChecksums.linear` with tensor operations launches about twenty kernels per piece of
rows and materialises int64 indices of every byte; on the H200 that cost a 32K-token 8B-shaped
prefill about 0.8 s of GPU time (bench/RESULTS.md).  Here one program per block reads its bytes
once, looks each up in the ``(n, 256)`` table and XORs them: one launch per piece.  Whether it is
faster is for ``bench/scripts/prefill_writes.py`` to measure (its ``disk-kernel-checksums`` variant); until
then it is not the default (``device_checksums.KERNEL``).
"""

from __future__ import annotations

import torch

from .triton_support import available, tl, triton  # noqa: F401 (available: this module's API)

BYTES_PER_STEP = 1024  # bytes of a block each program step reads


if triton is not None:

    @triton.jit
    def _xor(a, b):
        return a ^ b

    @triton.jit
    def _linear_kernel(data, table, out, N_BYTES: tl.constexpr, STEP: tl.constexpr):
        """Program ``i``: XOR over the bytes ``j`` of block ``i`` of ``table[j, data[i, j]]``."""
        block = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([STEP], dtype=tl.int32)
        for start in range(0, N_BYTES, STEP):
            offs = start + tl.arange(0, STEP)
            inside = offs < N_BYTES
            byte = tl.load(data + block * N_BYTES + offs, mask=inside, other=0).to(tl.int32)
            acc = acc ^ tl.load(table + offs * 256 + byte, mask=inside, other=0)
        tl.store(out + block, tl.reduce(acc, 0, _xor))


def linear(blocks: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``blocks: (N, n)`` uint8 (contiguous), ``table: (n * 256,)`` int32 -> ``(N,)`` int32 linear
    parts (their bits; callers mask to 0..2^32-1)."""
    n_blocks, n_bytes = blocks.shape
    out = torch.empty(n_blocks, dtype=torch.int32, device=blocks.device)
    if n_blocks:
        step = min(BYTES_PER_STEP, triton.next_power_of_2(n_bytes))
        _linear_kernel[(n_blocks,)](blocks, table, out, N_BYTES=n_bytes, STEP=step)
    return out

"""CRC-32C of a store's blocks and chunk files, computed on the device that holds the rows.

A prefill to disk writes every byte once and checksums it twice (each (head, block) byte range,
and each chunk file).  On the host that took the writer threads 1.5 s of GIL-holding CRC per 4.2
GB, which stalled the prefill's own Python (bench/scripts/prefill_writes.py, bench/RESULTS.md).  On the
GPU it is a few table lookups per byte, done where the rows already are.

CRC-32C (reflected, polynomial 0x82F63B78, initial and final XOR 0xFFFFFFFF) is affine in the
message bits.  For messages of a fixed length ``n``::

    crc(M) = XOR_i T[i][M[i]]  ^  K_n,    T[i][b] = F^(n-1-i)(t0[b]),    K_n = F^n(0xFFFFFFFF) ^ 0xFFFFFFFF

where ``t0`` is the byte table and ``F(x) = t0[x & 0xFF] ^ (x >> 8)`` feeds a zero byte: one
lookup per byte in an ``(n, 256)`` table, and an XOR of them (halving).  A chunk file is ``k``
blocks end to end; its linear part is ``XOR_j F^((k-1-j) n)(L_j)`` of the blocks' linear parts
``L_j``, each shift a 32x32 bit matrix applied as four byte tables.

Measured on the H200 (bench/scripts/prefill_writes.py, bench/RESULTS.md), a 32K-token 8B-shaped prefill
(4.2 GB checksummed): its forward took 2.82-2.89 s with these checksums, 2.98-3.00 s with the
host's (the writer threads holding the GIL) and 1.93-2.13 s with none, in one run.  The same linear
part as a float32 bit-matrix product and a parity was slower (forward 3.3-3.5 s, another run).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from . import crc_kernel

POLY = 0x82F63B78
MASK = 0xFFFFFFFF
# Compute the linear parts with the Triton kernel of crc_kernel.py where it can run (CUDA), instead
# of tensor operations.  Off until bench/scripts/prefill_writes.py measures it faster on the GPU machine.
KERNEL = False


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(POLY), t >> 1).astype(np.uint32)
    return t


T0 = _byte_table()


def _zero_bytes(x: np.ndarray, n: int) -> np.ndarray:
    """F^n(x), elementwise (n zero bytes fed to registers ``x``)."""
    x = x.astype(np.uint32, copy=True)
    for _ in range(n):
        x = T0[x & 0xFF] ^ (x >> 8)
    return x


def _apply(images: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The linear map with basis images ``images: (32,)`` applied to ``x`` (any shape, uint32)."""
    bits = (x[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    return np.bitwise_xor.reduce(np.where(bits.astype(bool), images, np.uint32(0)), axis=-1).astype(np.uint32)


@lru_cache(maxsize=8)
def _block_tables(n: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Per-position byte tables ``(n, 256)``, the constant ``K_n``, and the basis images of the
    shift by ``n`` zero bytes ``(32,)``."""
    tables = np.empty((n, 256), np.uint32)
    cur = T0.copy()
    tables[n - 1] = cur
    for i in range(n - 2, -1, -1):
        cur = T0[cur & 0xFF] ^ (cur >> 8)
        tables[i] = cur
    k_n = int(_zero_bytes(np.array([MASK], np.uint32), n)[0]) ^ MASK
    shift = _zero_bytes(np.uint32(1) << np.arange(32, dtype=np.uint32), n)
    return tables, k_n, shift


@lru_cache(maxsize=8)
def _file_tables(n: int, k: int) -> tuple[np.ndarray, int]:
    """Byte tables ``(k, 4, 256)`` of the shifts by ``(k-1-j) n`` bytes (block ``j`` of a file of
    ``k`` blocks of ``n`` bytes), and the file's constant ``K_{kn}``."""
    _, _, shift = _block_tables(n)
    images = np.uint32(1) << np.arange(32, dtype=np.uint32)  # the identity
    powers = []
    for _ in range(k):
        powers.append(images)
        images = _apply(shift, images)
    byte_values = np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None]  # (4, 256)
    tabs = np.stack([_apply(p, byte_values) for p in reversed(powers)])  # block j shifted by (k-1-j) blocks
    k_file = int(_apply(powers[-1], _apply(shift, np.array([MASK], np.uint32)))[0]) ^ MASK  # F^(kn)(init) ^ final
    return tabs, k_file


class DeviceChecksums:
    """CRC-32C of blocks of ``block_bytes`` bytes, and of files of ``file_blocks`` such blocks end to
    end, computed on ``device`` with tensor operations (no host sync)."""

    def __init__(self, block_bytes: int, file_blocks: int, device: torch.device | str) -> None:
        self.block_bytes, self.file_blocks = block_bytes, file_blocks
        self.device = torch.device(device)
        tables, k_n, _ = _block_tables(block_bytes)
        self._tables = torch.from_numpy(tables.view(np.int32).reshape(-1)).to(self.device)
        self._offsets = torch.arange(block_bytes, device=self.device, dtype=torch.int64) * 256
        self._k_block = k_n
        file_tabs, self._k_file = _file_tables(block_bytes, file_blocks)
        self._file_tables = torch.from_numpy(file_tabs.astype(np.int64)).to(self.device)  # (k, 4, 256)

    def linear(self, blocks: torch.Tensor) -> torch.Tensor:
        """``blocks: (..., block_bytes)`` uint8 -> their linear parts ``(...)`` int64 in 0..2^32-1."""
        lead = blocks.shape[:-1]
        if KERNEL and crc_kernel.available(blocks.device):
            return (crc_kernel.linear(blocks.reshape(-1, self.block_bytes).contiguous(), self._tables).to(torch.int64) & MASK).reshape(lead)
        v = torch.take(self._tables, self._offsets + blocks.reshape(-1, self.block_bytes).to(torch.int64))
        while v.shape[1] > 1:  # XOR of every lookup, halving
            half = v.shape[1] // 2
            odd = v[:, 2 * half :]
            v = torch.cat([v[:, :half] ^ v[:, half : 2 * half], odd], dim=1) if odd.shape[1] else v[:, :half] ^ v[:, half:]
        return (v[:, 0].to(torch.int64) & MASK).reshape(lead)

    def blocks(self, linear: torch.Tensor) -> torch.Tensor:
        """Block CRCs from their linear parts (any shape, int64)."""
        return linear ^ self._k_block

    def files(self, linear: torch.Tensor) -> torch.Tensor:
        """``linear: (..., file_blocks)`` linear parts of each file's blocks, in file order -> the
        files' CRCs ``(...)`` int64."""
        tabs = self._file_tables  # (k, 4, 256)
        k = torch.arange(self.file_blocks, device=linear.device)
        acc = torch.zeros(linear.shape, dtype=torch.int64, device=linear.device)
        for byte in range(4):
            acc ^= tabs[k, byte, (linear >> (8 * byte)) & 0xFF]
        while acc.shape[-1] > 1:
            half = acc.shape[-1] // 2
            odd = acc[..., 2 * half :]
            acc = torch.cat([acc[..., :half] ^ acc[..., half : 2 * half], odd], dim=-1) if odd.shape[-1] else acc[..., :half] ^ acc[..., half:]
        return acc[..., 0] ^ self._k_file

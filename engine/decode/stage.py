"""The units several queries select, each read once: a step of several sequences (batched
questions) over rows the device reads in place (zero-copy host memory, or device memory).

Each query selects its own units (blocks of ``unit`` tokens, or single tokens) per KV head; many
are shared.  :func:`stage_units` marks the union per KV head, gives each distinct unit a slot of a
staging buffer in device memory, and copies it there with one Triton kernel (``_stage_kernel``:
one program per KV head and a few slots, each reading whole rows of ``2 d`` values).  The
attention kernels then read every query's units from the staging buffer through the slot table,
as they read the disk tier's block cache (``kernels.fused_attention(table=...)``).

Before this, a step gathered the union row by row with ``index_select`` into a token-major copy,
expanded it per query and transposed it: three passes, the first of them over PCIe in 512-byte
pieces at about half the link's rate (bench/RESULTS.md, issue 23).

Static shapes and no host sync: a captured step (CUDA graph) runs it as it is.
"""

from __future__ import annotations

import torch

from ...storage.triton_support import tl, triton
from .kernels import _pow2

# Off: the union is gathered row by row (layer.union_read), as before (benchmarks compare the two).
ENABLED = True
ROWS_PER_PROGRAM = 16  # rows a staging program copies (several slots of single tokens, or one block)


if triton is not None:

    @triton.jit
    def _stage_kernel(rows, src, out, n_mid_ptr, HKV, M, UNIT: tl.constexpr, UP: tl.constexpr, SB: tl.constexpr,
                      F: tl.constexpr):
        """Slots ``SB`` at a time of KV head ``h``: ``out[h M + s]`` gets rows ``src[h, s] * UNIT +
        j`` (j < UNIT) of head ``h`` (those before ``n_mid``; the rest zeros); slots whose ``src``
        is -1 are left as they are (nothing reads them)."""
        h = tl.program_id(0)
        r = tl.arange(0, SB * UP)
        s = tl.program_id(1) * SB + r // UP
        j = r % UP
        n_mid = tl.load(n_mid_ptr)
        b = tl.load(src + h * (M + 1) + s, mask=s < M, other=-1)
        used = (s < M) & (b >= 0) & (j < UNIT)
        row = b.to(tl.int64) * UNIT + j
        ok = used & (row < n_mid)
        offs = tl.arange(0, F)
        x = tl.load(rows + (tl.where(ok, row, 0)[:, None] * HKV + h) * F + offs[None, :], mask=ok[:, None], other=0.0)
        dst = ((h * M + s).to(tl.int64) * UNIT + j)[:, None] * F + offs[None, :]
        tl.store(out + dst, x, mask=used[:, None])


def stage_units(rows: torch.Tensor, ids: torch.Tensor, unit: int, live: torch.Tensor, n_mid: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The units ``ids: (T, Hkv, U)`` (int64; the first ``live`` of each query's count) of ``rows:
    (capacity, Hkv, 2, d)``, each distinct (KV head, unit) read once.

    Returns ``staging: (Hkv * T * U, unit, 2, d)`` (KV head ``h``'s units in slots ``h T U ..``),
    ``table: (Hkv, ceil(capacity / unit))`` int32, the slot of each unit (-1: not selected), and
    the number of (row, KV head) pairs read, a device scalar (rows past ``n_mid`` are not read).
    """
    t, hkv, u = ids.shape
    cap, f = rows.shape[0], rows.shape[-2] * rows.shape[-1]
    nb, m, dev = -(-cap // unit), t * u, ids.device
    units = torch.arange(nb, device=dev)  # (NB,)
    wanted = torch.arange(u, device=dev) < live  # (U,)
    chosen = torch.where(wanted, ids, nb).transpose(0, 1).reshape(hkv, m)  # (Hkv, T U); nb: a column nobody reads
    mark = torch.zeros(hkv, nb + 1, dtype=torch.int32, device=dev)
    mark.scatter_(1, chosen, 1)
    mark = mark[:, :nb]
    rank = mark.cumsum(1, dtype=torch.int32) - 1  # (Hkv, NB) each marked unit's slot within its head
    first = torch.arange(hkv, dtype=torch.int32, device=dev)[:, None] * m
    table = torch.where(mark > 0, rank + first, -1)
    # (Hkv, M + 1) the unit in each slot; every unmarked unit lands in column M, which the kernel never reads
    src = torch.full((hkv, m + 1), -1, dtype=torch.int64, device=dev)
    src.scatter_(1, torch.where(mark > 0, rank, m).long(), units.expand(hkv, nb))
    in_unit = (n_mid - units * unit).clamp(0, unit)  # (NB,) rows of each unit before n_mid
    count = (mark * in_unit).sum()
    staging = torch.empty(hkv * m, unit, *rows.shape[-2:], dtype=rows.dtype, device=dev)
    up = _pow2(unit, 1)
    sb = max(1, ROWS_PER_PROGRAM // up)
    _stage_kernel[(hkv, -(-m // sb))](rows, src, staging, n_mid, hkv, m, UNIT=unit, UP=up, SB=sb, F=f)
    return staging, table, count

"""Top-K on the device in one kernel: the selectors' ranking of units.

``torch.topk`` over a row of a few thousand scores launches several kernels (49 us for 8 rows of
8,192 at 1 %, on the H100: bench/RESULTS.md); here one program per row ranks it: bisection on the
scores' order-preserving integer keys finds the count-th largest (32 counts over the row, held in
registers), the chosen are compacted and sorted, best first.  Rows longer than ``TOP_MAX`` (the
exact selector's keys, 1M-token block rows) stay with ``torch.topk``.
"""

from __future__ import annotations

import torch

from ...storage.triton_support import available, tl, triton
from .kernels import _pow2


if triton is not None:

    @triton.jit
    def _top_kernel(s_ptr, out_ptr, scratch_ptr, n, count, NP: tl.constexpr, KP: tl.constexpr):
        """One program per row of ``n`` scores: the ``count`` largest, best first (ties: lower
        index first).  The count-th largest is found by bisection on the scores' order-preserving
        unsigned 32-bit keys (32 counts over the row held in registers), the chosen ones are
        compacted into ``scratch`` with their index in the low 32 bits, and those ``KP`` are sorted."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, NP)
        inside = offs < n
        x = tl.load(s_ptr + row * n + offs, mask=inside, other=float("-inf"))
        bits = x.to(tl.uint32, bitcast=True)
        key = tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)  # float order as unsigned order
        key = tl.where(inside, key, 0)  # padding below every score, -inf included
        lo = tl.min(key, axis=0)  # invariant: at least `count` keys >= lo, and the answer <= hi
        hi = tl.max(key, axis=0)
        for _ in range(32):
            gap = hi - lo
            mid = lo + (gap >> 1) + (gap & 1)
            enough = tl.sum((key >= mid).to(tl.int32), axis=0) >= count
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        greater = key > lo
        ties = (key == lo).to(tl.int32)
        take = greater | ((ties > 0) & (tl.cumsum(ties, axis=0) <= count - tl.sum(greater.to(tl.int32), axis=0)))
        slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
        signed = (key ^ 0x80000000).to(tl.int32, bitcast=True).to(tl.int64)  # the same order, signed
        packed = (signed << 32) | (NP - 1 - offs).to(tl.int64)  # larger key first, then lower index
        tl.store(scratch_ptr + row * KP + slot, packed, mask=take)
        tl.debug_barrier()
        offs_k = tl.arange(0, KP)
        chosen = tl.load(scratch_ptr + row * KP + offs_k, mask=offs_k < count, other=-(1 << 62) * 2)
        best = tl.sort(chosen, descending=True)
        tl.store(out_ptr + row * count + offs_k, (NP - 1) - (best & 0xFFFFFFFF), mask=offs_k < count)


TOP_MAX = 16384  # longest row top_units ranks in one program (its scores in registers); torch.topk beyond


def top_units(s: torch.Tensor, count: int, warps: int | None = None) -> torch.Tensor:
    """Indices ``(..., count)`` int64 of the ``count`` largest of ``s: (..., n)`` float32, best
    first (a set torch.topk also returns; among equal scores the lower index first), for ``n <=
    TOP_MAX`` (torch.topk otherwise, and off CUDA).  ``warps``: the program's warps (default:
    :func:`top_warps`; the benchmark times others)."""
    n = s.shape[-1]
    if not (available(s.device) and n <= TOP_MAX and 0 < count <= n and s.dtype == torch.float32):
        return s.topk(count, dim=-1).indices
    s = s.contiguous()
    rows = s.numel() // n
    kp = _pow2(count, at_least=2)
    out = torch.empty(*s.shape[:-1], count, dtype=torch.int64, device=s.device)
    scratch = torch.empty(rows, kp, dtype=torch.int64, device=s.device)
    np_ = _pow2(n, at_least=2)
    _top_kernel[(rows,)](s, out, scratch, n, count, NP=np_, KP=kp, num_warps=warps or top_warps(np_))
    return out


def top_warps(width: int) -> int:
    """Warps of a program ranking a row padded to ``width`` (a power of two)."""
    return 8 if width >= 4096 else 4

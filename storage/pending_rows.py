"""Rows appended to the disk tier that no whole chunk holds yet, kept as the pieces they came in.

A piece is ``(Hkv, m, 2, d)`` raw rows in host memory.  Rows appended from a CUDA device are copied
into pinned memory asynchronously (:func:`stage`): the caller goes on launching work, and whoever
reads the piece first (a background writer, usually) waits for the copy's event.  Pieces are never
concatenated to be written: a chunk file is written from per-head slices of the pieces it spans
(``os.writev``), and checksums are extended across them.  A piece of whole chunk files copied from
a CUDA device also brings their checksums, computed there (:mod:`.device_checksums`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .device_checksums import DeviceChecksums
from .rows import raw_numpy_dtype, to_raw_numpy

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
# Stage rows from a CUDA device (checksums and copies) on a stream of their own, which waits for
# the rows and nothing else, so that the checksums may overlap the caller's next kernels.  Off
# until bench/scripts/prefill_writes.py (variant disk-side-stream) measures it on the GPU machine.
SIDE_STREAM = False
_SIDE: dict[torch.device, "torch.cuda.Stream"] = {}


@dataclass
class Piece:
    """``data: (Hkv, m, 2, d)`` raw rows; ``ready``: the event of their copy from the device (None
    once they are in host memory); ``owner``: the pinned tensors the arrays view (kept alive).

    With checksums (whole chunk files only): ``block_crcs: (Hkv, m / block_rows)`` of each
    (head, block) and ``file_crcs: (m / file_rows, head groups)`` of each chunk file, int64."""

    data: np.ndarray
    ready: torch.cuda.Event | None = None
    owner: tuple[torch.Tensor, ...] | None = None
    block_crcs: np.ndarray | None = None
    file_crcs: np.ndarray | None = None
    file_rows: int = 0

    @property
    def rows(self) -> int:
        return self.data.shape[1]

    def wait(self) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()  # releases the GIL while it waits
            self.ready = None
        return self.data

    def split(self, n: int) -> tuple["Piece", "Piece"]:
        """The first ``n`` rows and the rest, both views of this piece (same event and owner); the
        checksums go with them where ``n`` falls between chunk files."""
        first, rest = Piece(self.data[:, :n], self.ready, self.owner), Piece(self.data[:, n:], self.ready, self.owner)
        if self.block_crcs is not None and n % self.file_rows == 0:
            b = self.rows // self.block_crcs.shape[1]
            for part, sel in ((first, slice(0, n)), (rest, slice(n, None))):
                part.block_crcs = self.block_crcs[:, sel.start // b : None if sel.stop is None else sel.stop // b]
                part.file_crcs = self.file_crcs[sel.start // self.file_rows : None if sel.stop is None else sel.stop // self.file_rows]
                part.file_rows = self.file_rows
        return first, rest


def stage(rows: torch.Tensor, checks: DeviceChecksums | None = None, block_rows: int = 0, file_rows: int = 0,
          file_heads: int = 0) -> Piece:
    """``rows: (Hkv, m, 2, d)`` (any device) -> a host piece.  From a CUDA device the copy goes into
    pinned memory without waiting for it (its event is recorded on the current stream); from the
    CPU it is the rows' own memory.

    With ``checks`` (``m`` a multiple of ``file_rows``), the checksums of its (head, block) byte
    ranges of ``block_rows`` rows and of its chunk files (``file_rows`` rows of ``file_heads``
    heads each) are computed on the rows' device and copied with them."""
    if rows.device.type == "cuda" and SIDE_STREAM:
        side = _SIDE.get(rows.device)
        if side is None:
            side = _SIDE[rows.device] = torch.cuda.Stream(rows.device)
        side.wait_stream(torch.cuda.current_stream(rows.device))
        rows.record_stream(side)  # the caller's stream may free it: not before the side stream is done
        with torch.cuda.stream(side):
            return _stage(rows, checks, block_rows, file_rows, file_heads)
    return _stage(rows, checks, block_rows, file_rows, file_heads)


def _stage(rows: torch.Tensor, checks: DeviceChecksums | None, block_rows: int, file_rows: int, file_heads: int) -> Piece:
    crcs = None
    if checks is not None:
        h, m = rows.shape[:2]
        blocks = rows.contiguous().view(torch.uint8).reshape(h, m // block_rows, -1)
        linear = checks.linear(blocks)  # (Hkv, blocks)
        per_file = linear.reshape(h // file_heads, file_heads, m // file_rows, file_rows // block_rows)
        files = checks.files(per_file.permute(2, 0, 1, 3).reshape(m // file_rows, h // file_heads, -1))
        crcs = (checks.blocks(linear), files)
    if rows.device.type != "cuda":
        piece = Piece(to_raw_numpy(rows.contiguous()))
        if crcs is not None:
            piece.block_crcs, piece.file_crcs = crcs[0].numpy(), crcs[1].numpy()
    else:
        int_dt = _INT_VIEW[rows.element_size()]
        host = torch.empty(rows.shape, dtype=int_dt, pin_memory=True)
        host.copy_(rows.view(int_dt), non_blocking=True)
        owner: tuple[torch.Tensor, ...] = (host,)
        piece = Piece(host.numpy().view(raw_numpy_dtype(rows.dtype)))
        if crcs is not None:
            owner = (host, *(torch.empty(c.shape, dtype=c.dtype, pin_memory=True) for c in crcs))
            for dest, c in zip(owner[1:], crcs, strict=True):
                dest.copy_(c, non_blocking=True)
            piece.block_crcs, piece.file_crcs = owner[1].numpy(), owner[2].numpy()
        piece.ready, piece.owner = torch.cuda.Event(), owner
        piece.ready.record()
    if crcs is not None:
        piece.file_rows = file_rows
    return piece


class PendingRows:
    """The pieces of one layer, oldest first."""

    def __init__(self, heads: int, dim: int, raw: np.dtype) -> None:
        self.pieces: list[Piece] = []
        self.rows = 0
        self._empty = np.zeros((heads, 0, 2, dim), raw)

    def add(self, piece: Piece) -> None:
        if piece.rows:
            self.pieces.append(piece)
            self.rows += piece.rows

    def take(self, n: int) -> list[Piece]:
        """Remove and return the pieces of the first ``n`` rows (the last one split if it must be)."""
        if n > self.rows:
            raise ValueError(f"cannot take {n} of {self.rows} pending rows")
        out, need = [], n
        while need:
            p = self.pieces.pop(0)
            if p.rows > need:
                p, rest = p.split(need)
                self.pieces.insert(0, rest)
            out.append(p)
            need -= p.rows
        self.rows -= n
        return out

    def array(self) -> np.ndarray:
        """Every pending row as one ``(Hkv, rows, 2, d)`` array (the pieces are joined once)."""
        if not self.pieces:
            return self._empty
        if len(self.pieces) > 1:
            self.pieces = [Piece(np.concatenate([p.wait() for p in self.pieces], axis=1))]
        return self.pieces[0].wait()


class Segments:
    """Rows ``0..n`` of a run of pieces, addressed by row: per-head byte ranges without copies."""

    def __init__(self, pieces: list[Piece]) -> None:
        self.parts = [(p.wait(), start) for p, start in zip(pieces, np.cumsum([0] + [p.rows for p in pieces[:-1]]).tolist(), strict=True)]

    def head_slices(self, head: int, lo: int, hi: int) -> list[np.ndarray]:
        """Head ``head``'s rows ``lo..hi``: contiguous ``(r, 2, d)`` slices, in order."""
        out = []
        for data, start in self.parts:
            a, z = max(lo, start), min(hi, start + data.shape[1])
            if a < z:
                out.append(data[head, a - start : z - start])
        return out

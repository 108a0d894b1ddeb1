"""How KV rows are laid out in every tier: ``(Hkv, n, 2, d)`` per layer, key and value of a token
side by side (one read serves both), stored as the raw bits of the model's dtype so that a gather
returns exactly what was written (bf16 has no numpy dtype)."""

from __future__ import annotations

import numpy as np
import torch

# torch dtype -> (same-width integer torch dtype for bit views, numpy raw dtype, name)
_RAW = {
    torch.bfloat16: (torch.int16, np.dtype("<u2"), "bfloat16"),
    torch.float16: (torch.int16, np.dtype("<u2"), "float16"),
    torch.float32: (torch.int32, np.dtype("<u4"), "float32"),
}
DTYPES_BY_NAME = {name: dt for dt, (_, _, name) in _RAW.items()}


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _RAW:
        raise ValueError(f"KV dtype {dtype} is not supported: use bfloat16, float16 or float32")


def dtype_name(dtype: torch.dtype) -> str:
    check_dtype(dtype)
    return _RAW[dtype][2]


def raw_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    check_dtype(dtype)
    return _RAW[dtype][1]


def pack(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``keys, values: (Hkv, n, d)`` -> ``(Hkv, n, 2, d)`` in the same dtype and device."""
    if keys.shape != values.shape or keys.dtype != values.dtype:
        raise ValueError(f"keys {tuple(keys.shape)} {keys.dtype} and values {tuple(values.shape)} {values.dtype} must match")
    return torch.stack([keys, values], dim=2)


def to_raw_numpy(rows: torch.Tensor) -> np.ndarray:
    """Raw bits of ``rows`` as a numpy array of unsigned integers (a copy on the host)."""
    int_dt, np_dt, _ = _RAW[rows.dtype]
    return rows.detach().cpu().contiguous().view(int_dt).numpy().view(np_dt)


def from_raw_numpy(raw: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_raw_numpy` (shares memory with ``raw`` when it is contiguous)."""
    int_dt, _, _ = _RAW[dtype]
    return torch.from_numpy(np.ascontiguousarray(raw).view(_np_int(int_dt))).view(dtype)


def _np_int(int_dt: torch.dtype) -> np.dtype:
    return np.dtype("<i2") if int_dt == torch.int16 else np.dtype("<i4")


def row_bytes(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one token's key + value for one KV head."""
    return 2 * head_dim * (torch.finfo(dtype).bits // 8)

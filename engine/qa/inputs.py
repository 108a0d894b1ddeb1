"""What the public API accepts, checked at the door: one ``TypeError`` or ``ValueError`` that names
the argument and says what to pass, as the command line's one-line errors do."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ..sampling import SamplingConfig


def token_ids(value: object, tokenize: Callable[[str], list[int]], vocab_size: int, what: str) -> list[int]:
    """``value``: text (tokenized) or token ids (ints in ``[0, vocab_size)``) -> ids, never empty."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"the {what} is empty (or only whitespace)")
        ids = tokenize(value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"the {what} must be text (str) or a list of token ids, not bytes: decode it first "
                        "(data.decode('utf-8'))")
    elif isinstance(value, Sequence) or _is_int_tensor(value):
        ids = list(value.tolist() if _is_int_tensor(value) else value)
        bad = next((x for x in ids if not isinstance(x, numbers.Integral) or isinstance(x, bool)), None)
        if bad is not None:
            raise TypeError(f"the {what}'s token ids must be integers, got {type(bad).__name__} {bad!r:.40}")
        ids = [int(x) for x in ids]
        out = next((x for x in ids if not 0 <= x < vocab_size), None)
        if out is not None:
            raise ValueError(f"the {what} holds token id {out}, outside the model's vocabulary (0..{vocab_size - 1})")
    else:
        raise TypeError(f"the {what} must be text (str) or a list of token ids, not {type(value).__name__}")
    if not ids:
        raise ValueError(f"the {what} is empty")
    return ids


def several(value: object, what: str) -> list:
    """A non-empty list (or other sequence) of ``what`` (questions, prompts): not one text."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{what} must be a list of {what} (text or token ids), not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} is empty: give at least one of them")
    return list(value)


def sampling_config(value: object) -> SamplingConfig:
    """A :class:`SamplingConfig` (None: the defaults)."""
    if value is None:
        return SamplingConfig()
    if not isinstance(value, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, not {type(value).__name__}")
    return value


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def store_path(value: object) -> str | Path:
    """A store location: a local folder path (str or ``os.PathLike``, or a ``file://`` URL), or an
    ``s3://bucket/prefix`` URL (object storage), never empty.  Any other URL is refused, never
    taken for a path (``gs://b/x`` would otherwise be a local folder ``gs:``)."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise TypeError(f"a store is a folder path (str or pathlib.Path) or an s3:// URL, not {type(value).__name__}")
    if not value.strip():
        raise ValueError("the store path is empty")
    if _URL.match(value):
        if value.startswith("file://"):
            return value.removeprefix("file://") or "/"
        if value.startswith("s3://"):
            from ...storage.object_store import split_url

            split_url(value)  # a bad bucket name or prefix: one ValueError naming it
            return value
        raise ValueError(f"{value} is a URL rcengine cannot store to: a store is a local folder or an s3://bucket/prefix URL "
                         "(S3 or an S3-compatible server through AWS_ENDPOINT_URL)")
    return value


def flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__} {value!r:.40}")
    return value


def finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r:.40}")
    return float(value)


def _is_int_tensor(value: object) -> bool:
    """A one-dimensional integer torch tensor or numpy array."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.dim() == 1 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.integer)

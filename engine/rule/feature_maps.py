"""Positive feature maps phi(x) = exp(a(x)) with phi(q).phi(k) ~= exp(q.k / sqrt(d)).

A map works on log-features a(x), so summaries and estimates stay in the log domain.  One map per
layer; its parameters are per KV head (and, for data-fitted maps, per sequence).  Shapes:

- ``query_logits(qg: (B, Hkv, G, d)) -> (B, Hkv, G, r)``
- ``key_logits(k: (B, Hkv, n, d)) -> (B, Hkv, n, r)``

Maps compute in float32 (float64 if given float64), from the keys exactly as stored, so that the
prefill's summary and the decode-time subtraction see identical features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch


@runtime_checkable
class FeatureMap(Protocol):
    num_features: int

    def query_logits(self, qg: torch.Tensor) -> torch.Tensor: ...

    def key_logits(self, k: torch.Tensor) -> torch.Tensor: ...

    def state_bytes_per_head(self) -> int:
        """Bytes of per-sequence state the map itself holds per KV head (fitted centroids); the
        summary's own bytes are counted by :meth:`Summary.nbytes_per_head`."""
        ...


ESTIMATOR_KINDS: tuple[str, ...] = ("favor", "centroid", "learned", "none")


@dataclass(frozen=True, slots=True)
class EstimatorSpec:
    """How to build the completion estimator of every layer.

    ``kind``: ``"favor"`` (positive orthogonal random features, training-free), ``"centroid"``
    (k-means of the mid keys, training-free), ``"learned"`` (centroid clusters with a learned
    within-cluster mass term, calibrated per model: learned_maps.py) or ``"none"`` (Top-K only).
    ``num_features`` is r for favor (even: antithetic pairs) and the number of centroids for
    centroid and learned.  ``maps``: the folder of the learned maps (``rcengine calibrate``); None
    for the embedded model's own.
    """

    kind: Literal["favor", "centroid", "learned", "none"] = "favor"
    num_features: int = 64
    seed: int = 0
    kmeans_iters: int = 10
    maps: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ESTIMATOR_KINDS:
            raise ValueError(f"estimator kind {self.kind!r} is unknown: use one of {', '.join(ESTIMATOR_KINDS)}")
        if self.num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {self.num_features}")
        if self.kind == "favor" and self.num_features % 2:
            raise ValueError(f"favor needs an even num_features (antithetic pairs), got {self.num_features}")


def _dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass
class FavorFeatures:
    """Positive orthogonal random features (Performer FAVOR+), antithetic pairs.

    a(x) = [W x', -W x'] - |x'|^2 / 2 - log(sqrt(r)),  x' = x / d^(1/4),  ``W: (Hkv, r/2, d)``
    with orthogonal Gaussian rows, so E[phi(q).phi(k)] = exp(q.k / sqrt(d)) exactly.
    """

    W: torch.Tensor

    @staticmethod
    def create(
        num_kv_heads: int, head_dim: int, num_features: int, seed: int, device: torch.device | str = "cpu"
    ) -> "FavorFeatures":
        gen = torch.Generator().manual_seed(seed)
        half = num_features // 2
        heads = []
        for _ in range(num_kv_heads):
            blocks = []
            for _ in range(math.ceil(half / head_dim)):
                q, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64))
                # Rows of an orthogonal matrix, rescaled to the norms of Gaussian vectors.
                norms = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64).norm(dim=1)
                blocks.append(q.T * norms[:, None])
            heads.append(torch.cat(blocks)[:half])
        return FavorFeatures(torch.stack(heads).to(torch.float32).to(device))

    @property
    def num_features(self) -> int:
        return 2 * self.W.shape[-2]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        dt = _dtype(x)
        x = x.to(dt) / x.shape[-1] ** 0.25
        proj = torch.matmul(x, self.W.to(dt).transpose(-1, -2))  # (..., Hkv, n, r/2)
        base = -0.5 * (x * x).sum(dim=-1, keepdim=True) - 0.5 * math.log(self.num_features)
        return torch.cat([proj + base, base - proj], dim=-1)

    def query_logits(self, qg: torch.Tensor) -> torch.Tensor:
        return self._logits(qg)

    def key_logits(self, k: torch.Tensor) -> torch.Tensor:
        return self._logits(k)

    def state_bytes_per_head(self) -> int:
        return 0  # W is shared by every sequence, like a weight


@dataclass
class CentroidFeatures:
    """Centroid summary as a feature map: mass ~ n_c exp(q.c / sqrt(d)) per k-means cluster.

    ``centroids: (B, Hkv, C, d)``.  a(q)_c = q.c / sqrt(d); a(k) is the log of the one-hot of the
    key's nearest centroid (0 there, -inf elsewhere), so the summary holds per-cluster value sums
    and counts, and retrieved tokens are subtracted from their own cluster.
    """

    centroids: torch.Tensor

    @staticmethod
    def fit(k: torch.Tensor, num_centroids: int, iters: int = 10, seed: int = 0, max_points: int = 16384) -> "CentroidFeatures":
        """Lloyd's k-means of ``k: (B, Hkv, n, d)`` per (sequence, KV head), seeded; fitted on at
        most ``max_points`` evenly spaced keys (assignment later covers every key)."""
        b, h, n, d = k.shape
        x = k.to(_dtype(k))
        if n == 0:
            return CentroidFeatures(x.new_zeros(b, h, num_centroids, d))
        if n > max_points:
            x = x[:, :, torch.linspace(0, n - 1, max_points).long()]
        gen = torch.Generator().manual_seed(seed)
        init = torch.randperm(x.shape[2], generator=gen)[:num_centroids]
        if init.numel() < num_centroids:  # fewer keys than centroids: repeat, extras stay empty
            init = init.repeat(math.ceil(num_centroids / init.numel()))[:num_centroids]
        c = x[:, :, init.to(x.device)].clone()
        for _ in range(iters):
            assign = _nearest(x, c)  # (B, Hkv, n)
            onehot = torch.nn.functional.one_hot(assign, num_centroids).to(x.dtype)  # (B, Hkv, n, C)
            counts = onehot.sum(dim=2)  # (B, Hkv, C)
            sums = torch.matmul(onehot.transpose(-1, -2), x)  # (B, Hkv, C, d)
            c = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], c)
        return CentroidFeatures(c)

    @property
    def num_features(self) -> int:
        return self.centroids.shape[-2]

    def query_logits(self, qg: torch.Tensor) -> torch.Tensor:
        dt = _dtype(qg)
        return torch.matmul(qg.to(dt), self.centroids.to(dt).transpose(-1, -2)) / math.sqrt(qg.shape[-1])

    def assign(self, k: torch.Tensor) -> torch.Tensor:
        """The nearest centroid of each key, ``k: (B, Hkv, n, d) -> (B, Hkv, n)`` int64."""
        dt = _dtype(k)
        return _nearest(k.to(dt), self.centroids.to(dt))

    def key_logits(self, k: torch.Tensor) -> torch.Tensor:
        dt = _dtype(k)
        logits = k.new_full((*k.shape[:-1], self.num_features), -math.inf, dtype=dt)
        if k.shape[-2] == 0:
            return logits
        return logits.scatter(-1, self.assign(k)[..., None], 0.0)

    def state_bytes_per_head(self) -> int:
        c, d = self.centroids.shape[-2:]
        return c * d * self.centroids.element_size()


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid: ``x: (B, Hkv, n, d)``, ``c: (B, Hkv, C, d)`` -> ``(B, Hkv, n)``."""
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin.
    dist = (c * c).sum(dim=-1)[:, :, None, :] - 2 * torch.matmul(x, c.transpose(-1, -2))
    return dist.argmin(dim=-1)

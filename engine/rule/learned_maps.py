"""The learned completion map: centroid clusters with a learned within-cluster mass term.

Per KV head, a sequence's mid keys are clustered by k-means (as :class:`CentroidFeatures`), and a
key's features are the one-hot of its cluster.  The query's log-feature of cluster c adds to the
centroid's score a learned estimate of log mean_j exp(q.(k_j - c) / sqrt(d)), the mass the centroid
misses by Jensen's inequality (measured: the plain centroid under-estimates the unread mass by
e^-0.9 on low-entropy heads):

    a(q)_c = q.c / sqrt(d) + 1/(2d) [ sum_i tau_i (u_i.q)^2 s_ci + tau_0 |q_perp|^2 s_c0 ]
             + gamma_0 + gamma_1 |q|^2 / (2d)

- ``U: (Hkv, d, p)`` learned orthonormal directions of the group's queries (calibration);
  ``q_perp`` is q with those directions removed;
- ``s_ci``: the spread of cluster c's keys along u_i, ``s_c0``: their mean spread per remaining
  dimension (fitted per sequence with the centroids; p + 1 floats per cluster);
- ``tau: (Hkv, G, p + 1)`` and ``gamma: (Hkv, G, 2)``: learned per query head by distillation on
  the model's own activations (``engine/calibration/fit.py``): how much of the Gaussian term to
  trust once the Top-K tokens are gone, and a log-mass offset that may grow with the query's norm
  (peaked queries leave a larger Jensen gap).

The features are positive functions of the learned projection ``U^T q``; keys stay one-hot, so the
retrieved tokens' share is subtracted from their own cluster exactly as for centroids.  A learned
map at tau = gamma = 0 is the centroid map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .feature_maps import CentroidFeatures, _dtype


@dataclass
class LearnedParams:
    """One layer's learned parameters: ``U: (Hkv, d, p)``, ``tau: (Hkv, G, p + 1)``, ``gamma: (Hkv, G, 2)``."""

    U: torch.Tensor
    tau: torch.Tensor
    gamma: torch.Tensor

    def to(self, device: torch.device | str) -> LearnedParams:
        return LearnedParams(self.U.to(device), self.tau.to(device), self.gamma.to(device))


@dataclass
class LearnedCentroidFeatures:
    """``centroids: (B, Hkv, C, d)``, ``spreads: (B, Hkv, C, p + 1)`` (per sequence) and the layer's
    :class:`LearnedParams` (shared by every sequence, like weights)."""

    centroids: torch.Tensor
    spreads: torch.Tensor
    params: LearnedParams

    @staticmethod
    def fit(k: torch.Tensor, params: LearnedParams, num_centroids: int, iters: int = 10, seed: int = 0) -> LearnedCentroidFeatures:
        """Cluster ``k: (B, Hkv, n, d)`` (as :meth:`CentroidFeatures.fit`) and measure each cluster's
        spreads along the learned directions (the parameters are moved to the keys' device)."""
        params = params.to(k.device)
        base = CentroidFeatures.fit(k, num_centroids, iters, seed)
        return LearnedCentroidFeatures(base.centroids, cluster_spreads(k, base.centroids, params.U), params)

    @property
    def num_features(self) -> int:
        return self.centroids.shape[-2]

    def assign(self, k: torch.Tensor) -> torch.Tensor:
        """The nearest centroid of each key, ``k: (B, Hkv, n, d) -> (B, Hkv, n)``."""
        return CentroidFeatures(self.centroids).assign(k)

    def key_logits(self, k: torch.Tensor) -> torch.Tensor:
        return CentroidFeatures(self.centroids).key_logits(k)

    def query_logits(self, qg: torch.Tensor) -> torch.Tensor:
        """``qg: (B, Hkv, G, d) -> (B, Hkv, G, C)``."""
        dt = _dtype(qg)
        q = qg.to(dt)
        d = q.shape[-1]
        base = torch.matmul(q, self.centroids.to(dt).transpose(-1, -2)) / math.sqrt(d)
        return base + mass_terms(q, self.params.U.to(dt), self.spreads.to(dt), self.params.tau.to(dt), self.params.gamma.to(dt))

    def state_bytes_per_head(self) -> int:
        c, d = self.centroids.shape[-2:]
        return c * d * self.centroids.element_size() + self.spreads[0, 0].numel() * self.spreads.element_size()


def query_terms(q: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``q: (B, Hkv, G, d)``, ``U: (Hkv, d, p)`` -> ``(B, Hkv, G, p + 1)``: (u_i.q)^2 / (2d) and
    |q_perp|^2 / (2d)."""
    d = q.shape[-1]
    proj = torch.einsum("bhgd,hdp->bhgp", q, U)
    along = proj * proj
    perp = (q * q).sum(dim=-1, keepdim=True) - along.sum(dim=-1, keepdim=True)
    return torch.cat([along, perp.clamp_min(0.0)], dim=-1) / (2 * d)


def mass_terms(q: torch.Tensor, U: torch.Tensor, spreads: torch.Tensor, tau: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The learned term of ``a(q)``: ``q: (B, Hkv, G, d)``, ``spreads: (B, Hkv, C, p + 1)``,
    ``tau: (Hkv, G, p + 1)``, ``gamma: (Hkv, G, 2)`` -> ``(B, Hkv, G, C)``."""
    z = query_terms(q, U) * tau  # (B, Hkv, G, p + 1)
    offset = gamma[..., 0] + gamma[..., 1] * (q * q).sum(dim=-1) / (2 * q.shape[-1])  # (B, Hkv, G)
    return torch.einsum("bhgp,bhcp->bhgc", z, spreads) + offset[..., None]


def cluster_spreads(k: torch.Tensor, centroids: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Mean squared offset of each cluster's keys from its centroid along each direction of ``U:
    (Hkv, d, p)``, and per remaining dimension: ``k: (B, Hkv, n, d)``, ``centroids: (B, Hkv, C, d)``
    -> ``(B, Hkv, C, p + 1)``."""
    dt = _dtype(k)
    x, c, u = k.to(dt), centroids.to(dt), U.to(dt)
    b, h, n, d = x.shape
    C, p = c.shape[-2], u.shape[-1]
    out = x.new_zeros(b, h, C, p + 1)
    if n == 0:
        return out
    counts = x.new_zeros(b, h, C)
    step = 16384
    for start in range(0, n, step):  # bounded memory for long mid-regions
        part = x[:, :, start : start + step]
        assign = CentroidFeatures(c).assign(part)  # (B, Hkv, m)
        r = part - torch.gather(c, 2, assign[..., None].expand(-1, -1, -1, d))
        proj = torch.einsum("bhnd,hdp->bhnp", r, u)
        along = proj * proj
        perp = ((r * r).sum(dim=-1, keepdim=True) - along.sum(dim=-1, keepdim=True)).clamp_min(0.0) / max(d - p, 1)
        out.scatter_add_(2, assign[..., None].expand(-1, -1, -1, p + 1), torch.cat([along, perp], dim=-1))
        counts.scatter_add_(2, assign, torch.ones_like(assign, dtype=dt))
    return out / counts.clamp_min(1.0)[..., None]

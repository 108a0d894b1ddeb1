"""Estimators by kind: each layer's map built from an :class:`EstimatorSpec`, and a map's tensors
for persisting and back.  Above the maps (feature_maps.py, learned_maps.py), which do not know
one another's kinds."""

from __future__ import annotations

import torch

from .feature_maps import CentroidFeatures, EstimatorSpec, FavorFeatures, FeatureMap
from .learned_maps import LearnedCentroidFeatures, LearnedParams


def build_feature_map(
    spec: EstimatorSpec, layer: int, mid_keys: torch.Tensor | None, num_kv_heads: int, head_dim: int,
    device: torch.device | str = "cpu", learned: LearnedParams | None = None,
) -> FeatureMap | None:
    """The map of one layer.  ``mid_keys: (B, Hkv, n, d)`` is needed by data-fitted maps
    (centroid, learned); ``learned`` is the layer's calibrated parameters (learned); each layer's
    random features get their own seed derived from ``spec.seed``."""
    if spec.kind == "none":
        return None
    if spec.kind == "favor":
        return FavorFeatures.create(num_kv_heads, head_dim, spec.num_features, _layer_seed(spec.seed, layer), device)
    if mid_keys is None:
        raise ValueError(f"the {spec.kind} estimator is fitted on the mid-region keys: pass mid_keys")
    if spec.kind == "learned":
        if learned is None:
            raise ValueError("the learned estimator needs the layer's calibrated parameters (rcengine calibrate)")
        return LearnedCentroidFeatures.fit(mid_keys, learned, spec.num_features, spec.kmeans_iters, _layer_seed(spec.seed, layer))
    return CentroidFeatures.fit(mid_keys, spec.num_features, spec.kmeans_iters, _layer_seed(spec.seed, layer))


def _layer_seed(seed: int, layer: int) -> int:
    return (seed * 1_000_003 + layer) % (2**63)


def feature_map_tensors(fmap: FeatureMap) -> dict[str, torch.Tensor]:
    """The tensors that define a map, for persisting (see :func:`feature_map_from_tensors`)."""
    if isinstance(fmap, FavorFeatures):
        return {"W": fmap.W}
    if isinstance(fmap, CentroidFeatures):
        return {"centroids": fmap.centroids}
    if isinstance(fmap, LearnedCentroidFeatures):
        p = fmap.params
        return {"centroids": fmap.centroids, "spreads": fmap.spreads, "U": p.U, "tau": p.tau, "gamma": p.gamma}
    raise TypeError(f"cannot persist a feature map of type {type(fmap).__name__}")


def feature_map_from_tensors(kind: str, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> FeatureMap:
    if kind == "favor":
        return FavorFeatures(tensors["W"].to(device))
    if kind == "centroid":
        return CentroidFeatures(tensors["centroids"].to(device))
    if kind == "learned":
        t = {k: v.to(device) for k, v in tensors.items()}
        return LearnedCentroidFeatures(t["centroids"], t["spreads"], LearnedParams(t["U"], t["tau"], t["gamma"]))
    raise ValueError(f"estimator kind {kind!r} has no persisted form")

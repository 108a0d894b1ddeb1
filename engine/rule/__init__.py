"""The attention rule as pure tensor functions: exact, Top-K and retrieval-completion attention,
feature maps and their fixed-size summaries, budgets, and the in-memory reference of a layer."""

from .attention import (
    AttnState,
    completion_state,
    dense_attention,
    exact_state,
    group_queries,
    merge_states,
    normalize,
    rc_attention,
    topk_attention,
    ungroup,
)
from .budget import TokenCost, retrieval_count
from .context import LayerContext, attention_entropy
from .estimators import build_feature_map
from .feature_maps import CentroidFeatures, EstimatorSpec, FavorFeatures, FeatureMap
from .methods import METHODS, Method
from .retrieval import gather_tokens, group_scores, group_topk
from .summary import Summary

__all__ = [
    "AttnState", "CentroidFeatures", "EstimatorSpec", "FavorFeatures", "FeatureMap", "LayerContext",
    "METHODS", "Method", "Summary", "TokenCost", "attention_entropy", "build_feature_map", "completion_state",
    "dense_attention", "exact_state", "gather_tokens", "group_queries", "group_scores", "group_topk",
    "merge_states", "normalize", "rc_attention", "retrieval_count", "topk_attention", "ungroup",
]

"""The engine: the attention rule, feature maps and summaries, and (later) model integration."""

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
from .context import METHODS, LayerContext, attention_entropy
from .feature_maps import CentroidFeatures, EstimatorSpec, FavorFeatures, FeatureMap, build_feature_map
from .retrieval import gather_tokens, group_scores, group_topk
from .summary import Summary

__all__ = [
    "AttnState", "CentroidFeatures", "EstimatorSpec", "FavorFeatures", "FeatureMap", "LayerContext",
    "METHODS", "Summary", "TokenCost", "attention_entropy", "build_feature_map", "completion_state",
    "dense_attention", "exact_state", "gather_tokens", "group_queries", "group_scores", "group_topk",
    "merge_states", "normalize", "rc_attention", "retrieval_count", "topk_attention", "ungroup",
]

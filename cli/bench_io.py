"""``bench-io``: what each byte read buys.  The evaluation (rcengine.bench) loads only here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from .errors import user_errors_exit_2
from .options import DEVICE, MODEL, TRUST, csv, note, quiet_transformers

_EXAMPLES = {"--lengths": "4096,8192", "--tasks": "niah_single_number,common_words", "--budgets": "0.005,0.01,0.02,0.04",
             "--estimators": "centroid,learned,favor", "--tiers": "cpu,disk", "--selectors": "exact,block"}


def register(app: typer.Typer) -> None:
    app.command("bench-io")(bench_io)


def bandwidths(values: list[str]) -> tuple[tuple[str, float], ...]:
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


@user_errors_exit_2
def bench_io(
    quick: bool = typer.Option(False, "--quick", help="A small run (one length, two tasks, two budgets): what CI runs."),
    model: str = MODEL,
    lengths: str = typer.Option(None, "--lengths", help="Context lengths in tokens, comma-separated (default 4096,8192,16384)."),
    tasks: str = typer.Option(None, "--tasks", help="Task names, comma-separated (default: all nine)."),
    examples: int = typer.Option(None, "--examples", min=1, help="Examples per task and length (default 2)."),
    budgets: str = typer.Option(None, "--budgets", help="Budgets as fractions, comma-separated (default 0.005,0.01,0.02,0.04)."),
    estimators: str = typer.Option(None, "--estimators", help="rc estimators, comma-separated (default centroid,learned,favor; "
                                   "learned and favor get the centroid summary's bytes)."),
    maps: Path = typer.Option(None, "--maps", help="The learned estimator's maps (`rcengine calibrate`; default: those shipped for a named model)."),
    selectors: str = typer.Option(None, "--selectors", help="Selectors, comma-separated, exact first (default exact,block)."),
    haystack: str = typer.Option(None, "--haystack", help="What needles hide in: text (the eval split's documents, the "
                                 "default) or noise (RULER's repeated sentences)."),
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
    from rcengine.bench.io_bench import BenchIOConfig, run_bench_io

    base = BenchIOConfig.quick() if quick else BenchIOConfig()
    changes: dict[str, Any] = {}
    for name, value, convert in (("lengths", lengths, int), ("tasks", tasks, str), ("budgets", budgets, float),
                                 ("estimators", estimators, str), ("selectors", selectors, str), ("tiers", tiers, str)):
        if value is not None:
            changes[name] = csv(value, convert, f"--{name}", _EXAMPLES[f"--{name}"])
    if examples is not None:
        changes["examples"] = examples
    if haystack is not None:
        changes["haystack"] = haystack
    if maps is not None:
        changes["maps"] = str(maps)
    if io_bandwidth:
        changes["bandwidths"] = bandwidths(io_bandwidth)
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
    cfg = dataclasses.replace(base, **changes)  # validated by BenchIOConfig
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder: choose another --out")
    quiet_transformers()
    import rcengine
    from rcengine.bench.io_report import overview_table, write_report
    from rich.console import Console

    lm = rcengine.load_model(model, device=device, trust_remote_code=trust_remote_code, log=note)
    report = run_bench_io(lm, cfg)
    paths = write_report(report, out)
    Console(width=200).print(overview_table(report))
    for t in report["tradeoff"]:
        rho = "not reached" if t["rho_star"] is None else ("<= " if t["match"] == "at most" else "") + f"{t['rho_star']:.3g}"
        typer.echo(f"{t['length']} tokens: rc-{t['estimator']} matches topk@{t['topk_budget']:g} (KL {t['topk_kl']:.3g}) at rho* {rho}")
    typer.echo("wrote " + ", ".join(str(p) for p in paths))

"""``rcengine``: the typer app.  Thin: it parses, calls the public API, and prints.

Results go to stdout, progress to stderr.  Bad input ends with one line on stderr and exit code 2
(option errors too: click's boxed usage message is replaced by one line).  Nothing heavy is imported
until a command runs, so ``rcengine --help`` is quick.
"""

from __future__ import annotations

import json
import platform
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import typer

from . import bench_io, calibrate, decode
from .errors import EXIT_BAD_INPUT, fail
from .options import store_location

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

_PACKAGES = ("torch", "transformers", "numpy", "faiss-cpu", "zarr", "s3fs", "safetensors", "psutil", "typer", "rich")


@app.callback()
def _root() -> None:
    """Long-context decoding with retrieval-completion attention."""


decode.register(app)
bench_io.register(app)
calibrate.register(app)


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


def _store_report(store: Path, verify: bool) -> dict:
    """A persisted document's health, size and model, and the writers' temporary folders (and old
    stores moved aside) beside it."""
    import rcengine

    out = rcengine.store_health(store, verify)
    try:
        found = rcengine.temporaries(store)
    except rcengine.ArtifactError as e:  # an object store that cannot be listed: its error is the store's
        found = []
        out["error"] = out["error"] or str(e)
    out["temporaries"] = [{"path": str(t.path), "bytes": t.bytes, "live": t.live} for t in found]
    return out


def _models() -> dict:
    """The named models and whether each can load here."""
    import rcengine

    out = {}
    for name, m in rcengine.NAMED_MODELS.items():
        try:
            where = str(rcengine.model_source_file(name))
        except FileNotFoundError as e:
            where = None
            out[name] = {"summary": m.summary, "available": False, "detail": str(e)}
            continue
        out[name] = {"summary": m.summary, "available": True, "detail": where, "maps": str(m.maps) if m.maps else None}
    return out


@app.command()
def info(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    store: str = typer.Option(None, "--store", callback=store_location, help="Also check this persisted document's health and list the temporary "
                               "folders of interrupted prefills beside it (removed by the next prefill of that store)."),
    verify: bool = typer.Option(False, "--verify", help="With --store: read every file of the store and check every checksum."),
) -> None:
    """Versions, compute device, storage tiers, and the embedded default model."""
    import rcengine

    default = rcengine.default_model_path()
    report = {
        "rcengine": rcengine.__version__,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "device": _device(),
        "tiers": {t.name: {"available": t.available, "detail": t.detail} for t in rcengine.available_tiers()},
        "default_model": str(default) if (default / "config.json").exists() else None,
        "models": _models(),
        "scratch": [{"path": str(t.path), "bytes": t.bytes, "live": t.live} for t in rcengine.stale_scratch()],
    }
    if verify and store is None:
        fail("--verify checks a store: add --store DIR")
    if store is not None:
        report["store"] = _store_report(store, verify)
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
    for name, m in report["models"].items():
        table.add_row(f"model {name}", f"{m['summary']}: " + (m["detail"] if m["available"] else f"not here ({m['detail']})"))
    for t in report["scratch"]:
        table.add_row("scratch store", f"{t['path']} ({t['bytes'] / 1e6:.1f} MB, {'in use' if t['live'] else 'stale'})")
    if store is not None:
        st = report["store"]
        health = ("healthy, every checksum verified" if st["verified"] else "healthy (opens; --verify reads every checksum)") \
            if st["healthy"] else f"NOT healthy: {st['error']}"
        table.add_row("store", f"{st['path']}: " + (f"{st['tokens']} tokens, model {st['model']}, {st['created']}; "
                                                      if st.get("tokens") is not None else "") + health)
        for t in st["temporaries"]:
            table.add_row("  temporary", f"{t['path']} ({t['bytes'] / 1e6:.1f} MB, {'being written' if t['live'] else 'stale'})")
    Console().print(table)


# click's usage error (typer vendors click in recent releases, so the class is found from typer's).
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: a prefill's temporary or scratch store is removed


def run(argv: list[str] | None = None) -> int:
    """Run one command line (``argv`` without the program name; default ``sys.argv[1:]``) in this
    process -> its exit code.  Usage errors become one line and code 2, as in :func:`main`."""
    try:
        code = app(args=argv, prog_name="rcengine", standalone_mode=False)  # an Exit raised by a command comes back as its code
    except _UsageError as e:
        command = e.ctx.command_path if e.ctx is not None else "rcengine"
        typer.echo(f"error: {e.format_message()} (see {command} --help)", err=True)
        return EXIT_BAD_INPUT
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return 130
    return code if isinstance(code, int) else 0


def main() -> None:
    """Console-script entry point: SIGTERM unwinds like Ctrl-C, then :func:`run`."""
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(run())


if __name__ == "__main__":
    main()

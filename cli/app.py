"""``rcengine``: the typer app.  Thin: it parses, calls the public API, and prints."""

from __future__ import annotations

import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import typer

import rcengine

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Long-context decoding with retrieval-completion attention.")

_PACKAGES = ("torch", "transformers", "numpy", "faiss-cpu", "zarr", "safetensors", "psutil", "typer", "rich")


@app.callback()
def _root() -> None:
    """Long-context decoding with retrieval-completion attention."""


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
    """Versions, compute device, and the storage tiers available here."""
    report = {
        "rcengine": rcengine.__version__,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "device": _device(),
        "tiers": {t.name: {"available": t.available, "detail": t.detail} for t in rcengine.available_tiers()},
    }
    if as_json:
        print(json.dumps(report, indent=2))
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
    Console().print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

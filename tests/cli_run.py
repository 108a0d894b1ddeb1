"""The command line run in this process, as a user sees it: stdout, stderr and the exit code.

typer's test runner swaps the standard streams; :func:`rcengine.cli.app.run` is what the console
script runs after installing its SIGTERM handler, usage errors' one-line form included.  A new
interpreter per call (torch imported, CUDA initialised: seconds each) is kept for what needs one:
the entry point itself, signals, and what importing leaves out.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from typer.testing import CliRunner

from rcengine.cli.app import run


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def rc(*args: str) -> Ran:
    """``rcengine ARGS...`` in this process."""
    with CliRunner().isolation() as (out, err, _):
        code = run(list(args))
        return Ran(code, out.getvalue().decode(), err.getvalue().decode())


def rc_process(*args: str, timeout: float = 300) -> Ran:
    """``python -m rcengine.cli.app ARGS...`` in a new process."""
    out = subprocess.run([sys.executable, "-m", "rcengine.cli.app", *args], capture_output=True, text=True, timeout=timeout)
    return Ran(out.returncode, out.stdout, out.stderr)

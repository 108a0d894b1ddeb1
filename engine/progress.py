"""Progress of long work on stderr: a live bar on a terminal, plain lines in a log (at most one
every ``LOG_EVERY_S`` seconds, and one at the end)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

LOG_EVERY_S = 5.0


@contextlib.contextmanager
def progress(description: str, total: int, unit: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)`` for ``total`` units of work."""
    if not enabled:
        yield lambda n=1: None
        return
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"{description} ({unit})", total=total)
            yield lambda n=1: bar.advance(task, n)
        return
    t0 = last = time.perf_counter()
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.perf_counter()
        if now - last >= LOG_EVERY_S and done < total:
            last = now
            print(f"{description}: {done}/{total} {unit} ({now - t0:.0f} s)", file=sys.stderr, flush=True)

    yield advance
    if time.perf_counter() - t0 >= LOG_EVERY_S:
        print(f"{description}: {done}/{total} {unit} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

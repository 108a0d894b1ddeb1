"""How the CLI fails: one line on stderr, ``error: ...``, and exit code 2 for bad input or bad stored
data; never a traceback for those."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or bad stored data (resolved when raised: importing them at
    start would load torch for ``--help``)."""
    import rcengine

    return (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError,
            rcengine.ArtifactError, rcengine.CorruptChunkError, rcengine.NoSpaceError)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def user_errors_exit_2(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; bad input ends with one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as e:
            if isinstance(e, user_errors()):
                fail(one_line(e))
            raise

    return wrapper

"""Files written whole or not at all, readable as any new file is."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .space import NoSpaceError, is_no_room


def new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (mkstemp's files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> Path:
    """``write(tmp)`` fills a temporary file beside ``path`` (named ``.NAME.*SUFFIX``; writers that
    infer a format from it need the right suffix), which is synced and renamed over ``path``; on
    any failure the temporary is removed and ``path`` is left as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_no_room(e):
            raise NoSpaceError(f"no room to write {path} on its file system: free some space there or choose another "
                               "location") from e
        raise
    return path

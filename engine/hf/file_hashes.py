"""SHA-256 of model files, computed once per file version and remembered.

A model's fingerprint hashes every weight byte (16 GB for an 8B model: about a minute on one core),
so each digest is kept under the user's cache folder, keyed by what identifies one version of a
file without reading it: its resolved path, device, inode, size and modification time.  A file
changed in place gets a new modification time and is hashed again.  Entries are written whole
(temporary file, then rename), so concurrent processes never read half an entry; an entry that
does not parse is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_HEX64 = re.compile(r"[0-9a-f]{64}")


def cache_root() -> Path:
    """rcengine's cache folder: ``$RCENGINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/rcengine``, else
    ``~/.cache/rcengine``."""
    env = os.environ.get("RCENGINE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rcengine"


def sha256_file(path: str | Path, remember: bool = True) -> str:
    """The SHA-256 (hex) of the file at ``path``; looked up in the cache first when ``remember``."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    entry = cache_root() / "sha256" / key
    if remember:
        try:
            cached = entry.read_text(encoding="ascii").strip()
            if _HEX64.fullmatch(cached):
                return cached
        except (OSError, UnicodeDecodeError):
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    digest = h.hexdigest()
    if remember and os.stat(path).st_mtime_ns == st.st_mtime_ns:  # not changed while it was read
        _remember(entry, digest)
    return digest


def _remember(entry: Path, digest: str) -> None:
    """Best effort: a cache that cannot be written only costs hashing again next time."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sha256-", dir=entry.parent)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(digest)
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass

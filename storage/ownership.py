"""What a prefill may replace: only an absent path, an empty folder, or an rcengine store that
holds nothing but what its manifest lists.  Never a user's folder, the current folder or one above
it, the home folder, or a file; never through a symbolic link inside the folder."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Literal

from .errors import NotAStoreError
from .manifest import FORMAT, KV_STORE, MANIFEST, MAX_MANIFEST_BYTES
from .safe_files import read_regular

Target = Literal["absent", "empty", "store"]


def check_target(final: Path, spelled: str) -> Target:
    """What is at the resolved store path ``final`` (``spelled`` as the user gave it), or one
    :class:`NotAStoreError` / ``NotADirectoryError`` saying why a prefill must not write there."""
    _refuse_protected(final, spelled)
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return "absent"
    if stat.S_ISLNK(st.st_mode):
        raise NotAStoreError(f"{spelled} is a symbolic link: give the store's own path")
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"cannot write a store at {spelled}: it is a file, not a folder; choose another store")
    entries = sorted(os.listdir(final))
    if not entries:
        return "empty"
    files, kv = _owned(final, spelled, entries)
    foreign = _first_foreign(final, files, kv)
    if foreign is not None:
        raise NotAStoreError(f"{spelled} is an rcengine store that also holds {foreign}, which rcengine did not write: move "
                             "it out of the store, or choose another store")
    return "store"


def is_own_store(folder: Path) -> bool:
    """Whether ``folder`` holds an rcengine store and nothing else (a writer's leftover checked
    before it is removed)."""
    try:
        return check_target(folder, str(folder)) == "store"
    except (NotAStoreError, OSError, ValueError):
        return False


def _refuse_protected(final: Path, spelled: str) -> None:
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if spelled.rstrip("/") in (".", "..", "~") or final == cwd or final in cwd.parents:
        raise NotAStoreError(f"cannot write a store at {spelled}: it is the current folder or one above it; give the store "
                             "a folder of its own (for example ./doc.rcs)")
    if final == home or final in home.parents:
        raise NotAStoreError(f"cannot write a store at {spelled}: it is the home folder or one above it; give the store a "
                             "folder of its own (for example ~/doc.rcs)")


def _owned(final: Path, spelled: str, entries: list[str]) -> tuple[set[str], set[str]]:
    """The files the folder's manifest lists (top level, and relative to kv.zarr)."""
    not_store = (f"{spelled} holds files that are not an rcengine store ({', '.join(entries[:3])}"
                 f"{', ...' if len(entries) > 3 else ''}): a prefill replaces only an empty folder or a store; choose a new or "
                 "empty folder")
    if MANIFEST not in entries:
        raise NotAStoreError(not_store)
    try:
        manifest = json.loads(read_regular(final / MANIFEST, MAX_MANIFEST_BYTES))
    except (OSError, ValueError):
        raise NotAStoreError(not_store) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NotAStoreError(not_store)
    files, kv = manifest.get("files"), manifest.get("kv_checksums")
    if not isinstance(files, dict) or not isinstance(kv, dict):
        raise NotAStoreError(f"{spelled} holds an rcengine store whose manifest is damaged: remove it yourself if it is not "
                             "needed, or choose another store")
    return {str(n) for n in files} | {MANIFEST}, {str(k).split("@", 1)[0] for k in kv}


def _first_foreign(final: Path, files: set[str], kv: set[str]) -> str | None:
    """The first entry of the folder that is not a listed regular file, kv.zarr, or a folder of it."""
    for name in sorted(os.listdir(final)):
        mode = os.lstat(final / name).st_mode
        if name == KV_STORE and stat.S_ISDIR(mode):
            found = _first_foreign_kv(final / KV_STORE, "", kv)
            if found is not None:
                return f"{KV_STORE}/{found}"
        elif name not in files or not stat.S_ISREG(mode):
            return name
    return None


def _first_foreign_kv(folder: Path, prefix: str, kv: set[str]) -> str | None:
    for name in sorted(os.listdir(folder)):
        rel = f"{prefix}{name}"
        mode = os.lstat(folder / name).st_mode
        if stat.S_ISDIR(mode):
            found = _first_foreign_kv(folder / name, f"{rel}/", kv)
            if found is not None:
                return found
        elif rel not in kv or not stat.S_ISREG(mode):
            return rel
    return None

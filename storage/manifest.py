"""A prefill artifact's manifest: written with a checksum of its own, and checked field by field
(a schema of types and ranges) before anything in it is used, so that an edited or damaged
manifest is refused in one line instead of answering from wrong data.

    {"format": "rcengine-prefill", "format_version": 3, "created": "...Z",
     "store_id": "<hex>",                       a new one for every commit (replacements are noticed)
     "model": {"fingerprint": {...}, "digest": "<hex>", "name": "..."},
     "meta": {...},                              the caller's (checked by the caller: document_store.py)
     "files": {NAME: {"crc32c": "<8 hex>", "bytes": N[, "block_bytes": B, "blocks": ["<8 hex>", ...]]}},
     "kv_checksums": {KEY: "<8 hex>"},           every object of kv.zarr (KEY@OFFSET: a block of a chunk)
     ["data": "gen-<32 hex>",]                   an s3:// store's: where its files are (object_store.py)
     "checksum": "<sha256 hex>"}                 of the canonical JSON of everything else

The checksum catches damage and careless edits; the field checks (here and the caller's
cross-checks against the data) catch the rest, so that even a consistent edit cannot make a reader
allocate without bound or read outside what was written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from .errors import ArtifactError

FORMAT = "rcengine-prefill"
FORMAT_VERSION = 3  # 3: the manifest's own checksum, store ids, checked fields
MANIFEST = "manifest.json"
KV_STORE = "kv.zarr"
# The largest manifest read (131K block checksums of a 32K-token 8B-shaped store take about 5 MB).
MAX_MANIFEST_BYTES = 1 << 30

_CRC = re.compile(r"[0-9a-f]{8}")
GENERATION = re.compile(r"gen-[0-9a-f]{32}")  # an s3:// store's data (object_store.py)
_HEX = re.compile(r"[0-9a-f]{8,64}")
# A file of the artifact: a plain name; a KV object: a relative path of plain names (and @OFFSET).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_KV_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*(@[0-9]+)?")


def canonical(manifest: dict[str, Any]) -> str:
    """The manifest's text: compact and sorted, so that it reads back to the same checksum."""
    return json.dumps(manifest, separators=(",", ":"), sort_keys=True)


def checksum(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in manifest.items() if k != "checksum"}).encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> str:
    """The text of ``manifest`` with its checksum."""
    return canonical({**manifest, "checksum": checksum(manifest)})


def parse(text: bytes, location: str) -> dict[str, Any]:
    """A manifest read from disk, checked (format, version, checksum, every field's type and
    range) -> the manifest; anything else is one :class:`ArtifactError`."""
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise ArtifactError(f"the manifest of {location} is not valid JSON ({msg}): the artifact is corrupt; re-run the "
                            "prefill") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{location} is not an rcengine prefill artifact (its manifest.json is not one)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{location} has format version {version!r}, this rcengine reads {FORMAT_VERSION}: re-run the "
                            "prefill (rcengine prefill FILE --store STORE --overwrite)")
    if manifest.get("checksum") != checksum(manifest):
        raise ArtifactError(f"the manifest of {location} does not match its checksum: it was edited or damaged after the "
                            "prefill; re-run the prefill or restore the store from a copy")
    bad = _first_problem(manifest)
    if bad is not None:
        raise ArtifactError(f"the manifest of {location} is malformed ({bad}): re-run the prefill")
    return manifest


def owned_files(manifest: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The artifact's own top-level files and the KV store's files (relative to kv.zarr): the only
    things a store folder may hold besides folders."""
    kv = {key.split("@", 1)[0] for key in manifest["kv_checksums"]}
    return set(manifest["files"]) | {MANIFEST}, kv


def _first_problem(m: dict[str, Any]) -> str | None:  # noqa: PLR0911 (one check a line)
    if not isinstance(m.get("created"), str) or not isinstance(m.get("store_id"), str) or not _HEX.fullmatch(m["store_id"]):
        return "created or store_id"
    model = m.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), dict) or not isinstance(model.get("digest"), str) \
            or not isinstance(model.get("name", ""), str):
        return "model"
    if not isinstance(m.get("meta"), dict):
        return "meta"
    files = m.get("files")
    if not isinstance(files, dict):
        return "files"
    for name, entry in files.items():
        if not _NAME.fullmatch(name) or name in (MANIFEST, KV_STORE):
            return f"file name {name!r}"
        if not isinstance(entry, dict) or not _is_count(entry.get("bytes")) or not _is_crc(entry.get("crc32c")):
            return f"entry of {name}"
        if "blocks" in entry or "block_bytes" in entry:
            size, blocks = entry.get("block_bytes"), entry.get("blocks")
            if not _is_count(size) or size < 1 or not isinstance(blocks, list) or not all(map(_is_crc, blocks)) \
                    or len(blocks) != -(-entry["bytes"] // size):
                return f"blocks of {name}"
    if "data" in m and not (isinstance(m["data"], str) and GENERATION.fullmatch(m["data"])):
        return "data"
    kv = m.get("kv_checksums")
    if not isinstance(kv, dict) or not all(isinstance(k, str) and _KV_KEY.fullmatch(k) and ".." not in k.split("/")
                                           and _is_crc(v) for k, v in kv.items()):
        return "kv_checksums"
    return None


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62


def _is_crc(x: Any) -> bool:
    return isinstance(x, str) and bool(_CRC.fullmatch(x))


def record(cls: type, value: Any, what: str, location: str) -> Any:
    """An instance of the dataclass ``cls`` from a stored dict, its fields' types checked against
    their annotations (the class's own ``__post_init__`` checks the ranges); anything else is one
    :class:`ArtifactError` naming ``what``."""
    import dataclasses

    bad = f"the manifest of {location} has a malformed {what}"
    if not isinstance(value, dict):
        raise ArtifactError(f"{bad} (not an object): re-run the prefill")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ArtifactError(f"{bad} (unknown field {unknown[0]!r}): re-run the prefill")
    for name, v in value.items():
        if not _fits(str(fields[name].type), v):
            raise ArtifactError(f"{bad} ({name} = {v!r:.40}): re-run the prefill")
    try:
        return cls(**value)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{bad} ({str(e).splitlines()[0] if str(e) else type(e).__name__}): re-run the prefill") from None


def _fits(annotation: str, v: Any) -> bool:
    """Whether ``v`` has the JSON type the annotation names: ``int``, ``float``, ``str``, ``bool``,
    ``dict[...]``, each optionally ``| None``; any other name (a ``Literal`` or an alias of one)
    takes a string, whose value the class checks."""
    kinds = [a.strip() for a in annotation.split("|")]
    if v is None:
        return "None" in kinds
    plain_int = isinstance(v, int) and not isinstance(v, bool)
    for kind in kinds:
        if kind == "bool":
            ok = isinstance(v, bool)
        elif kind == "int":
            ok = plain_int and abs(v) < 1 << 62
        elif kind == "float":
            ok = (plain_int or isinstance(v, float)) and math.isfinite(v)
        elif kind.startswith("dict"):
            ok = isinstance(v, dict)
        elif kind == "None":
            ok = False
        else:
            ok = isinstance(v, str)
        if ok:
            return True
    return False

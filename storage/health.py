"""A persisted store's health, for ``rcengine info --store``: what opening it checks (the manifest,
its checksum and fields, the folder's entries, every listed file present, the KV store's
metadata), and with ``verify`` every checksum of every file, read whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifact import Artifact
from .checked_store import CheckedStore, Ledger
from .checksums import CorruptChunkError, crc32c_hex
from .document_store import DocumentMeta
from .errors import ArtifactError
from .kv_metadata import checked_metadata
from .manifest import KV_STORE
from .object_store import is_remote, remote_errors
from .rows import DTYPES_BY_NAME
from .safe_files import read_regular
from .tier import TierLayout


def store_health(location: str | Path, verify: bool = False) -> dict[str, Any]:
    """-> ``{"healthy": bool, "error": str | None, ...}``: never raises for a damaged store."""
    out: dict[str, Any] = {"path": str(location), "healthy": False, "error": None, "verified": False}
    try:
        art = Artifact.open(location)
        meta = art.meta
        out.update({"tokens": meta.get("tokens"), "model": art.manifest["model"].get("name"), "created": art.manifest["created"],
                    "estimator": meta.get("estimator"), "store_id": art.manifest["store_id"]})
        _check_kv(art)
        if verify:
            out["bytes_verified"] = _verify_all(art)
            out["verified"] = True
        out["healthy"] = True
    except (ArtifactError, CorruptChunkError, OSError, ValueError) as e:
        out["error"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return out


def _check_kv(art: Artifact) -> None:
    """The KV store's metadata reads, verified, and agrees with itself."""
    import zarr

    from .disk_tier import open_store

    ledger = Ledger(checksums=dict(art.kv_checksums), strict=True, location=art.kv_location)
    try:
        group = zarr.open_group(CheckedStore(open_store(art.kv_location, read_only=True), ledger), mode="r")
    except FileNotFoundError:
        raise CorruptChunkError(f"the KV store of {art.location} is missing") from None
    except CorruptChunkError:
        raise
    except Exception as e:  # noqa: BLE001 (zarr raises many types for metadata it cannot parse)
        raise ArtifactError(f"the KV store of {art.location} is malformed ({type(e).__name__})") from None
    meta = DocumentMeta.from_dict(art.meta, art.location)
    layout = TierLayout(meta.num_layers, meta.num_kv_heads, meta.head_dim, DTYPES_BY_NAME[meta.dtype])
    checked_metadata(group, art.kv_location, layout, meta.mid_rows)


def _verify_all(art: Artifact) -> int:
    """Every file of the artifact and every object of its KV store read whole and checked -> bytes."""
    total = 0
    for name in sorted(art.manifest["files"]):
        total += len(art.read_bytes(name))
    remote = is_remote(art.location)
    for key, expected in sorted(art.kv_checksums.items()):
        if "@" in key:  # a block of a chunk file: covered by the file's own checksum
            continue
        if remote:
            with remote_errors(art.location):
                try:
                    data = art.fs.cat_file(f"{art.root}/{KV_STORE}/{key}")
                except FileNotFoundError:
                    raise CorruptChunkError(f"{KV_STORE}/{key} of {art.location} is missing: the store is damaged; re-run the "
                                            "prefill") from None
        else:
            data = read_regular(Path(art.root) / KV_STORE / key)
        if crc32c_hex(data) != expected:
            raise CorruptChunkError(f"{KV_STORE}/{key} of {art.location} fails its checksum: the store is damaged; re-run the "
                                    "prefill or restore it from a copy")
        total += len(data)
    return total

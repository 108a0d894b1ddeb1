"""Persisted prefills: a folder (or fsspec URL) that reopens without recomputation.

Contents::

    manifest.json        written last: format version, model fingerprint, the caller's metadata
                         (dtype, layout, sink/tail, estimator, index, token count), a checksum of
                         every file and of every object of the KV store, and one of itself
                         (``manifest.py``)
    kv.zarr/             the mid-region KV (see disk_tier.py)
    *.safetensors        tensors: anchors, summaries, feature maps (never pickle)
    *.bin                opaque blobs, e.g. serialised key indexes

A writer replaces only what it may (``ownership.py``: an absent path, an empty folder, or an
rcengine store holding nothing but what its manifest lists, the latter with ``overwrite``), and
holds the store's lock (``store_lock.py``) from its first check to its commit or abort: one writer
per store.  Commit is atomic on a local file system: everything is written under a temporary
sibling (``.NAME.tmp-XXXXXXXX``, whose writer also holds a lock on ``.NAME.tmp-XXXXXXXX.lock``),
fsynced, the manifest last, and the folder renamed into place.  Replacing a store takes two
renames (the old one aside to ``.NAME.old-XXXXXXXX``, the new one in) and then the old one's
removal; a process killed between the renames leaves the old store aside, and the next writer of
that store (or :func:`~.temporaries.reclaim_stale`) renames it back; one killed during the removal
leaves part of it, which the next writer removes.  A half-written artifact never opens: it has no
manifest, or carries a temporary name.  On a URL (object stores have no rename) files are written
in place and the manifest, written last, is the commit point; replacing removes the old manifest
first, except at ``s3://`` URLs, which publish generations under a lease (``object_store.py``).

Opening checks the manifest (its checksum, then every field) and, on a local file system, that
the folder holds only folders and regular files (a FIFO or a link in a store is refused before
anything reads it) with every listed file present; every file's checksum is verified as it is
read, KV chunks as the tier reads them.  Several readers at once are safe: nothing is written to a
committed artifact.  A reader whose store was replaced while it read is told so
(:meth:`Artifact.replaced`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import safetensors.torch
import torch
from fsspec.implementations.local import LocalFileSystem

from .block_reader import BlockReader
from .checksums import CorruptChunkError, crc32c_hex
from .errors import ArtifactError, ModelMismatchError
from .manifest import FORMAT, FORMAT_VERSION, KV_STORE, MANIFEST, MAX_MANIFEST_BYTES, parse, seal
from .object_store import current_generation, is_remote, remote_errors
from .ownership import check_target
from .remote_publish import RemotePublish, generation_of, read_manifest
from .safe_files import check_local_files, fsync_dir, fsync_tree, missing_manifest, read_regular
from .store_lock import StoreLock
from .temporaries import Temporary, lock_path, reclaim_stale, remove_tree

__all__ = ["FORMAT", "FORMAT_VERSION", "KV_STORE", "MANIFEST", "Artifact", "ArtifactError", "ArtifactWriter", "BlockReader",
           "ModelMismatchError", "fingerprint_digest"]


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A short stable digest of a model fingerprint (any JSON-ready dict)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _fs(location: str | Path, follow_last: bool = True) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """The file system and path of ``location``; a local path made absolute, its last component
    resolved only if ``follow_last`` (a writer never writes through a link it was given)."""
    fs, path = fsspec.core.url_to_fs(str(location))
    local = isinstance(fs, LocalFileSystem)
    if not local:
        return fs, path, local
    p = Path(path)
    if follow_last or p.name in ("", ".", ".."):
        return fs, str(p.resolve()), local
    return fs, str(p.parent.resolve() / p.name), local


def _join(fs: fsspec.AbstractFileSystem, root: str, name: str, local: bool) -> str:
    path = f"{root}/{name}"
    return path if local else fs.unstrip_protocol(path)


class ArtifactWriter:
    """Use as a context manager: leaving it by an exception removes what was written.  On a local
    file system it first takes the store's lock (``wait``: wait for another writer instead of
    refusing; ``log`` says so), then puts back or removes what interrupted writers of the store
    left (``reclaimed`` lists it)."""

    def __init__(self, location: str | Path, overwrite: bool = False, wait: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.location = str(location)
        self.remote: RemotePublish | None = None
        if is_remote(self.location):  # (fsspec's own s3 file system is never made: ours has the deadlines)
            self.fs, self.final, self.local = None, self.location, False
        else:
            self.fs, self.final, self.local = _fs(location, follow_last=False)
        self.reclaimed: list[Temporary] = []
        self._lock: StoreLock | None = None
        self._lock_fd: int | None = None
        self._files: dict[str, dict[str, Any]] = {}
        self._done = False
        if self.local:
            self._open_local(overwrite, wait, log)
        elif self.fs is None:
            self.remote = RemotePublish(self.location, overwrite, wait, log)
            self.fs, self.root, self.reclaimed = self.remote.fs, self.remote.root, self.remote.reclaimed
        else:
            self.root = self.final
            if self.fs.exists(f"{self.final}/{MANIFEST}"):
                if not overwrite:
                    raise FileExistsError(f"a prefill artifact already exists at {location}: choose another store or overwrite "
                                          "it (--overwrite, or overwrite=True)")
                self.fs.rm(f"{self.final}/{MANIFEST}")  # the old artifact stops opening first
            self.fs.makedirs(self.final, exist_ok=True)

    def _open_local(self, overwrite: bool, wait: bool, log: Callable[[str], None] | None) -> None:
        final = Path(self.final)
        for ancestor in final.parents:
            if ancestor.exists() and not ancestor.is_dir():
                raise NotADirectoryError(f"cannot write a store at {self.location}: {ancestor} is a file, not a folder")
        check_target(final, self.location)  # refused before any lock or folder is made
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._lock = StoreLock(final, wait, log)
            self.reclaimed = reclaim_stale(final, locked=True)
            target = check_target(final, self.location)
            if target == "store" and not overwrite:
                raise FileExistsError(f"a prefill artifact already exists at {self.location}: choose another store or "
                                      "overwrite it (--overwrite, or overwrite=True)")
            self._lock_fd = os.open(lock_path(tmp), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # taken before the folder exists
            tmp.mkdir()
            self.root = str(tmp)
        except BaseException as e:
            self._release(tmp)
            if isinstance(e, OSError) and not isinstance(e, (FileExistsError, NotADirectoryError)):
                raise PermissionError(f"cannot write a store at {self.location}: {e.strerror or e}") from e
            raise

    @property
    def kv_location(self) -> str:
        """Where the KV store goes (create a DiskTier there): a path, or a URL for remote ones."""
        return _join(self.fs, self.root, KV_STORE, self.local)

    def put_bytes(self, name: str, data: bytes, block_bytes: int | None = None) -> None:
        """A file.  With ``block_bytes`` each block of that size also gets a checksum, so that the
        file can be read block by block, each verified (:meth:`Artifact.block_reader`)."""
        if "/" in name or name in (MANIFEST, KV_STORE) or name.startswith("."):
            raise ValueError(f"{name!r} is not a valid artifact file name")
        with remote_errors(self.location):
            self.fs.pipe_file(f"{self.root}/{name}", bytes(data))
        entry: dict[str, Any] = {"crc32c": crc32c_hex(data), "bytes": len(data)}
        if block_bytes is not None:
            view = memoryview(data)
            entry["block_bytes"] = block_bytes
            entry["blocks"] = [crc32c_hex(view[i : i + block_bytes]) for i in range(0, len(data), block_bytes)]
        self._files[name] = entry

    def put_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors as ``NAME.safetensors`` (CPU copies of their own: views of one buffer are saved apart)."""
        data = safetensors.torch.save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()})
        self.put_bytes(f"{name}.safetensors", data)

    def commit(self, fingerprint: dict[str, Any], meta: dict[str, Any], kv_checksums: dict[str, str],
               lap: Callable[[str], None] | None = None, model_name: str = "") -> None:
        """Write the manifest and make the artifact visible; ``lap(name)`` after each part (timing)."""
        lap = lap or (lambda _name: None)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "store_id": uuid.uuid4().hex,
            "model": {"fingerprint": fingerprint, "digest": fingerprint_digest(fingerprint), "name": model_name},
            "meta": meta,
            "files": self._files,
            "kv_checksums": kv_checksums,
            **({"data": self.remote.generation} if self.remote is not None else {}),
        }
        # Compact: the block checksums make most of it (131K of them for a 32K-token 8B-shaped store:
        # 0.11 s indented, 0.06 s compact, on the CPU dev machine).
        text = seal(manifest)
        lap("commit: manifest")
        if self.remote is not None:
            self.remote.commit(text)
            self._done = True
            return
        if not self.local:
            with self.fs.open(f"{self.root}/{MANIFEST}", "w") as f:
                f.write(text)
            self._done = True
            return
        root, final = Path(self.root), Path(self.final)
        fsync_tree(root)
        lap("commit: fsync")
        part = root / f"{MANIFEST}.part"
        with open(part, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, root / MANIFEST)
        fsync_dir(root)
        self._publish(root, final)
        self._done = True
        self._release(root)
        lap("commit: rename")

    def _publish(self, root: Path, final: Path) -> None:
        """Move the finished folder into place, under the store's lock, checking again what it
        replaces (a user may have put something there while the prefill ran)."""
        target = check_target(final, self.location)
        old = None
        if target == "empty":
            os.rmdir(final)  # fails, touching nothing, if a file appeared since
        elif target == "store":
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(root, final)
        fsync_dir(final.parent)
        if old is not None:
            remove_tree(old)

    def _release(self, tmp: Path | None = None) -> None:
        if self._lock_fd is not None:
            if tmp is not None:
                lock_path(tmp).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def abort(self) -> None:
        if self._done:
            return
        if self.local:
            remove_tree(self.root)
        elif self.remote is not None:
            self.remote.abort()
        self._done = True
        self._release(Path(self.root) if self.local else None)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is not None:
            self.abort()


class Artifact:
    """A committed artifact, opened read-only."""

    def __init__(self, location: str, fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any],
                 identity: tuple[int, int] | None = None, prefix: str | None = None) -> None:
        self.location = location
        self.fs = fs
        self.root = root
        self.manifest = manifest
        self._identity = identity  # (device, inode) of a local store's folder when it was opened
        self._prefix = prefix  # an s3:// store's prefix (its root is the generation the manifest names)

    @staticmethod
    def open(location: str | Path, expect_fingerprint: dict[str, Any] | None = None, expect_name: str = "") -> "Artifact":
        """Open and check the artifact at ``location``; with ``expect_fingerprint`` (the loaded
        model's, called ``expect_name``), one made with another model is refused."""
        if is_remote(str(location)):
            fs, prefix, text = read_manifest(str(location), MAX_MANIFEST_BYTES)
            manifest = parse(text, str(location))
            root = f"{prefix}/{generation_of(manifest, str(location))}"
            Artifact._check_model(manifest, str(location), expect_fingerprint, expect_name)
            return Artifact(str(location), fs, root, manifest, prefix=prefix)
        fs, root, local = _fs(location)
        identity = None
        if local:
            folder = Path(root)
            if folder.is_file():
                raise ArtifactError(f"{location} is a file, not a prefill artifact (a folder made by rcengine prefill or "
                                    "generate --store)")
            try:
                text = read_regular(folder / MANIFEST, MAX_MANIFEST_BYTES)
            except FileNotFoundError:
                raise ArtifactError(missing_manifest(folder, location)) from None
            except NotADirectoryError:
                raise ArtifactError(f"no prefill artifact at {location}: a part of its path is a file") from None
            st = os.stat(folder)
            identity = (st.st_dev, st.st_ino)
        else:
            try:
                with fs.open(f"{root}/{MANIFEST}", "rb") as f:
                    text = f.read(MAX_MANIFEST_BYTES + 1)
            except FileNotFoundError:
                what = "no prefill artifact" if not fs.exists(root) else "an incomplete prefill artifact (no manifest.json)"
                raise ArtifactError(f"{what} at {location}") from None
        manifest = parse(text, str(location))
        if local:
            check_local_files(Path(root), manifest, str(location))
        Artifact._check_model(manifest, str(location), expect_fingerprint, expect_name)
        return Artifact(str(location), fs, root, manifest, identity)

    @staticmethod
    def _check_model(manifest: dict[str, Any], location: str, expect_fingerprint: dict[str, Any] | None, expect_name: str) -> None:
        """With ``expect_fingerprint`` (the loaded model's, called ``expect_name``), a store made
        with another model is refused."""
        if expect_fingerprint is None:
            return
        theirs, ours = manifest["model"], fingerprint_digest(expect_fingerprint)
        if theirs["digest"] != ours:
            raise ModelMismatchError(f"{location} was made with model {theirs.get('name') or '?'} ({theirs['digest']}), not with the "
                                     f"loaded model {expect_name or '?'} ({ours}): load that model or re-run the prefill")

    def replaced(self) -> bool:
        """Whether the store at this location is no longer the one opened (a prefill replaced it)."""
        if self._prefix is not None:
            with contextlib.suppress(Exception):
                return current_generation(self.fs, self._prefix) != self.root.rsplit("/", 1)[-1]
            return False
        if self._identity is None:
            return False
        try:
            st = os.stat(self.root)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._identity

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest["meta"]

    @property
    def kv_location(self) -> str:
        return _join(self.fs, self.root, KV_STORE, isinstance(self.fs, LocalFileSystem))

    @property
    def kv_checksums(self) -> dict[str, str]:
        return self.manifest["kv_checksums"]

    def read_bytes(self, name: str) -> bytes:
        """A file's bytes, verified against the manifest."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise ArtifactError(f"{self.location} has no file {name!r}")
        try:
            if isinstance(self.fs, LocalFileSystem):
                data = read_regular(f"{self.root}/{name}", entry["bytes"])
            else:
                with remote_errors(self.location):
                    data = self.fs.cat_file(f"{self.root}/{name}", start=0, end=entry["bytes"] + 1)
        except FileNotFoundError:
            raise CorruptChunkError(f"file {name!r} of {self.location} is missing") from None
        if len(data) != entry["bytes"] or crc32c_hex(data) != entry["crc32c"]:
            raise CorruptChunkError(
                f"file {name!r} of {self.location} fails its checksum ({len(data)} bytes, manifest says {entry['bytes']}): "
                "the artifact is corrupt; re-run the prefill or restore it from a copy"
            )
        return data

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        data = self.read_bytes(f"{name}.safetensors")
        try:
            return safetensors.torch.load(data)
        except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for a bad header)
            raise ArtifactError(f"file {name}.safetensors of {self.location} is not a valid tensor file "
                                f"({type(e).__name__}): re-run the prefill") from None

    def block_reader(self, name: str) -> "BlockReader":
        """Read a file written with block checksums one verified block at a time (nothing of it is
        kept in memory between reads)."""
        entry = self.manifest["files"].get(name)
        if entry is None or "blocks" not in entry:
            raise ArtifactError(f"{self.location} has no block-checksummed file {name!r}")
        return BlockReader(self.fs, f"{self.root}/{name}", name, self.location, entry)

"""Persisted prefills: a folder (or fsspec URL) that reopens without recomputation.

Contents::

    manifest.json        written last: format version, model fingerprint, the caller's metadata
                         (dtype, layout, sink/tail, estimator, index, token count), a checksum of
                         every file and of every object of the KV store
    kv.zarr/             the mid-region KV (see disk_tier.py)
    *.safetensors        tensors: anchors, summaries, feature maps (never pickle)
    *.bin                opaque blobs, e.g. serialised key indexes

Commit is atomic on a local file system: everything is written under a temporary sibling
(``.NAME.tmp-XXXXXXXX``, whose writer holds an exclusive lock on ``.NAME.tmp-XXXXXXXX.lock`` while it
lives), fsynced, the manifest last, and the folder renamed into place (replacing an old artifact takes two renames;
a process killed between them leaves none, with the old one beside it under ``.NAME.old-*``).  A
half-written artifact never opens: it has no manifest, or carries a temporary name.  On a URL
(object stores have no rename) files are written in place and the manifest, written last, is the
commit point; replacing removes the old manifest first.

A writer killed midway leaves its temporary folder behind; the next writer of the same store
removes every such folder whose lock no live process holds (:func:`reclaim_stale`, listed with
their sizes by :func:`temporaries`); it never touches one a live writer holds.

Opening verifies the format version and the model fingerprint, and every file's checksum as it is
read; KV chunks are verified as the tier reads them.  Several readers at once are safe: nothing
is written to a committed artifact.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import safetensors.torch
import torch
from fsspec.implementations.local import LocalFileSystem

from .checksums import CorruptChunkError, crc32c_hex
from .temporaries import Temporary, lock_path, reclaim_stale, remove_tree

FORMAT = "rcengine-prefill"
FORMAT_VERSION = 2  # 2: flat key indexes stored as plain block-checksummed key files
MANIFEST = "manifest.json"
KV_STORE = "kv.zarr"


class ArtifactError(Exception):
    """An artifact that cannot be used; the message says what and how to fix it."""


class ModelMismatchError(ArtifactError):
    pass


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A short stable digest of a model fingerprint (any JSON-ready dict)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _fs(location: str | Path) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    fs, path = fsspec.core.url_to_fs(str(location))
    local = isinstance(fs, LocalFileSystem)
    return fs, (str(Path(path).resolve()) if local else path), local


def _join(fs: fsspec.AbstractFileSystem, root: str, name: str, local: bool) -> str:
    path = f"{root}/{name}"
    return path if local else fs.unstrip_protocol(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactWriter:
    """Use as a context manager: leaving it by an exception removes what was written.  On a local
    file system it first removes stale temporaries of the same store (``reclaimed`` lists them)."""

    def __init__(self, location: str | Path, overwrite: bool = False) -> None:
        self.location = str(location)
        self.fs, self.final, self.local = _fs(location)
        self.reclaimed: list[Temporary] = []
        self._lock_fd: int | None = None
        if self.local:
            final = Path(self.final)
            for ancestor in [final, *final.parents]:
                if ancestor.exists() and not ancestor.is_dir():
                    raise NotADirectoryError(f"cannot write a store at {location}: {ancestor} is a file, not a folder")
        if self.fs.exists(f"{self.final}/{MANIFEST}") and not overwrite:
            raise FileExistsError(f"a prefill artifact already exists at {location}: choose another store or overwrite it "
                                  "(--overwrite, or overwrite=True)")
        if self.local:
            parent = Path(self.final).parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
                self.reclaimed = reclaim_stale(self.final)
                tmp = parent / f".{Path(self.final).name}.tmp-{uuid.uuid4().hex[:8]}"
                self._lock_fd = os.open(lock_path(tmp), os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # taken before the folder exists
                tmp.mkdir()
                self.root = str(tmp)
            except OSError as e:
                if self._lock_fd is not None:
                    lock_path(tmp).unlink(missing_ok=True)
                    os.close(self._lock_fd)
                    self._lock_fd = None
                raise PermissionError(f"cannot write a store at {location}: {e.strerror}") from e
        else:
            self.root = self.final
            if self.fs.exists(f"{self.final}/{MANIFEST}"):
                self.fs.rm(f"{self.final}/{MANIFEST}")  # the old artifact stops opening first
            self.fs.makedirs(self.final, exist_ok=True)
        self._files: dict[str, dict[str, Any]] = {}
        self._done = False

    @property
    def kv_location(self) -> str:
        """Where the KV store goes (create a DiskTier there): a path, or a URL for remote ones."""
        return _join(self.fs, self.root, KV_STORE, self.local)

    def put_bytes(self, name: str, data: bytes, block_bytes: int | None = None) -> None:
        """A file.  With ``block_bytes`` each block of that size also gets a checksum, so that the
        file can be read block by block, each verified (:meth:`Artifact.block_reader`)."""
        if "/" in name or name in (MANIFEST, KV_STORE) or name.startswith("."):
            raise ValueError(f"{name!r} is not a valid artifact file name")
        with self.fs.open(f"{self.root}/{name}", "wb") as f:
            f.write(data)
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
               lap: Callable[[str], None] | None = None) -> None:
        """Write the manifest and make the artifact visible; ``lap(name)`` after each part (timing)."""
        lap = lap or (lambda _name: None)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"fingerprint": fingerprint, "digest": fingerprint_digest(fingerprint)},
            "meta": meta,
            "files": self._files,
            "kv_checksums": kv_checksums,
        }
        # Compact: the block checksums make most of it (131K of them for a 32K-token 8B-shaped store:
        # 0.11 s indented, 0.06 s compact, on the CPU dev machine).
        text = json.dumps(manifest, separators=(",", ":"), sort_keys=True)
        lap("commit: manifest")
        if not self.local:
            with self.fs.open(f"{self.root}/{MANIFEST}", "w") as f:
                f.write(text)
            self._done = True
            return
        root, final = Path(self.root), Path(self.final)
        _fsync_tree(root)
        lap("commit: fsync")
        part = root / f"{MANIFEST}.part"
        with open(part, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, root / MANIFEST)
        _fsync_dir(root)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(root, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        self._unlock()
        lap("commit: rename")

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        if self.local and hasattr(self, "root"):
            lock_path(Path(self.root)).unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def abort(self) -> None:
        if self._done:
            return
        if self.local:
            remove_tree(self.root)
        self._done = True
        self._unlock()

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is not None:
            self.abort()


class Artifact:
    """A committed artifact, opened read-only."""

    def __init__(self, location: str, fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any]) -> None:
        self.location = location
        self.fs = fs
        self.root = root
        self.manifest = manifest

    @staticmethod
    def open(location: str | Path, expect_fingerprint: dict[str, Any] | None = None) -> "Artifact":
        fs, root, local = _fs(location)
        if local and Path(root).is_file():
            raise ArtifactError(f"{location} is a file, not a prefill artifact (a folder made by rcengine prefill or generate --store)")
        try:
            with fs.open(f"{root}/{MANIFEST}", "r") as f:
                text = f.read()
        except FileNotFoundError:
            hint = ""
            if local:
                old = sorted(Path(root).parent.glob(f".{Path(root).name}.old-*"))
                if old:
                    hint = f" (a replacement was interrupted; the previous artifact is at {old[-1]}: rename it back)"
            what = "no prefill artifact" if not fs.exists(root) else "an incomplete prefill artifact (no manifest.json)"
            raise ArtifactError(f"{what} at {location}{hint}") from None
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"the manifest of {location} is not valid JSON ({e.msg}): the artifact is corrupt") from None
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"{location} is not an rcengine prefill artifact")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{location} has format version {manifest.get('format_version')}, this rcengine reads {FORMAT_VERSION}: re-run the prefill"
            )
        if expect_fingerprint is not None:
            theirs = manifest["model"]
            ours = fingerprint_digest(expect_fingerprint)
            if theirs.get("digest") != ours:
                raise ModelMismatchError(
                    f"{location} was made with model {theirs['fingerprint'].get('name', '?')} ({theirs.get('digest')}), "
                    f"not with the loaded model {expect_fingerprint.get('name', '?')} ({ours}): load that model or re-run the prefill"
                )
        return Artifact(str(location), fs, root, manifest)

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
            with self.fs.open(f"{self.root}/{name}", "rb") as f:
                data = f.read()
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
        return safetensors.torch.load(self.read_bytes(f"{name}.safetensors"))

    def block_reader(self, name: str) -> "BlockReader":
        """Read a file written with block checksums one verified block at a time (nothing of it is
        kept in memory between reads)."""
        entry = self.manifest["files"].get(name)
        if entry is None or "blocks" not in entry:
            raise ArtifactError(f"{self.location} has no block-checksummed file {name!r}")
        return BlockReader(self.fs, f"{self.root}/{name}", name, self.location, entry)


class BlockReader:
    """Verified reads of fixed-size blocks of one artifact file."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, name: str, location: str, entry: dict[str, Any]) -> None:
        self.fs, self.path, self.name, self.location = fs, path, name, location
        self.block_bytes: int = entry["block_bytes"]
        self.size: int = entry["bytes"]
        self._crcs: list[str] = entry["blocks"]
        self.bytes_read = 0

    @property
    def num_blocks(self) -> int:
        return len(self._crcs)

    def read(self, block: int) -> bytes:
        offset = block * self.block_bytes
        want = min(self.block_bytes, self.size - offset)
        try:
            with self.fs.open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read(want)
        except FileNotFoundError:
            raise CorruptChunkError(f"file {self.name!r} of {self.location} is missing") from None
        if len(data) != want or crc32c_hex(data) != self._crcs[block]:
            raise CorruptChunkError(
                f"block {block} of file {self.name!r} of {self.location} fails its checksum: "
                "the artifact is corrupt; re-run the prefill or restore it from a copy"
            )
        self.bytes_read += len(data)
        return data

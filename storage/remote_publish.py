"""Writing and reading a store at an ``s3://`` URL: the writer's side of the publish protocol
(``object_store.py`` has the layout and the lease) and what a reader and ``info --store`` need."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from .errors import ArtifactError
from .object_store import (
    LOCK, MANIFEST, RemoteLease, check_target, current_generation, filesystem, generation_bytes, is_remote, listing, new_generation,
    remote_errors, require_bucket, split_url,
)
from .temporaries import Temporary
from .temporaries import temporaries as local_temporaries


class RemotePublish:
    """A writer of the store at ``url``: holds its lease, has removed what interrupted writers left,
    and writes a new generation under :attr:`root` (``bucket/prefix/gen-...``, no scheme)."""

    def __init__(self, url: str, overwrite: bool, wait: bool, log: Callable[[str], None] | None) -> None:
        self.url = url
        bucket, key = split_url(url)
        self.prefix = f"{bucket}/{key}"
        self.generation = new_generation()
        self.root = f"{self.prefix}/{self.generation}"
        self.reclaimed: list[Temporary] = []
        with remote_errors(url):
            self.fs = filesystem()
            require_bucket(self.fs, bucket)
            check_target(self.fs, url, self.prefix, overwrite)  # refused before the lease is taken
            self.lease = RemoteLease(self.fs, url, self.prefix, wait, log)
            try:
                self.previous = current_generation(self.fs, self.prefix)
                self.reclaimed = self._reclaim()
                check_target(self.fs, url, self.prefix, overwrite)
            except BaseException:
                self.lease.release()
                raise

    def _reclaim(self) -> list[Temporary]:
        """Remove the generations the committed manifest does not name (we hold the lease: no
        live writer owns them)."""
        _, gens, _ = listing(self.fs, self.prefix)
        out = []
        for gen in gens:
            if gen != self.previous:
                path = f"{self.prefix}/{gen}"
                size = generation_bytes(self.fs, path)
                self.fs.rm(path, recursive=True)
                out.append(Temporary(f"s3://{path}", size, live=False))
        return out

    def commit(self, text: str) -> None:
        """Publish: the manifest (naming this generation) in one PUT, then remove the old generation."""
        with remote_errors(self.url):
            self.lease.check_held()
            self.fs.pipe_file(f"{self.prefix}/{MANIFEST}", text.encode())
            if self.previous is not None and self.previous != self.generation:
                with contextlib.suppress(FileNotFoundError):  # the next writer removes what is left
                    self.fs.rm(f"{self.prefix}/{self.previous}", recursive=True)
        self.lease.release()

    def abort(self) -> None:
        """Remove what this writer uploaded (best effort: a server that is gone leaves it to the
        next writer of the store), then give the lease back."""
        with contextlib.suppress(Exception):
            if self.fs.exists(self.root):
                self.fs.rm(self.root, recursive=True)
        self.lease.release()


def read_manifest(url: str, limit: int) -> tuple[object, str, bytes]:
    """(the file system, the store's prefix, the manifest's bytes) of the store at ``url``."""
    bucket, key = split_url(url)
    prefix = f"{bucket}/{key}"
    with remote_errors(url):
        fs = filesystem()
        try:
            text = fs.cat_file(f"{prefix}/{MANIFEST}", start=0, end=limit + 1)
        except FileNotFoundError:
            require_bucket(fs, bucket)
            _, gens, _ = listing(fs, prefix)
            what = "an incomplete prefill artifact (no manifest.json)" if gens else "no prefill artifact"
            raise ArtifactError(f"{what} at {url}") from None
    return fs, prefix, text


def store_temporaries(location: str | Path) -> list[Temporary]:
    """What interrupted writers left at a store: beside a local folder, or in an ``s3://`` prefix
    (generations its manifest does not name, and a lease that is held)."""
    if not is_remote(location):
        return local_temporaries(location)
    url = str(location)
    bucket, key = split_url(url)
    prefix = f"{bucket}/{key}"
    with remote_errors(url):
        fs = filesystem()
        _, gens, _ = listing(fs, prefix)
        if not gens:
            return []
        current = current_generation(fs, prefix)
        leased = fs.exists(f"{prefix}/{LOCK}")
        return [Temporary(f"s3://{prefix}/{g}", generation_bytes(fs, f"{prefix}/{g}"), live=leased)
                for g in gens if g != current]


def generation_of(manifest: dict, url: str) -> str:
    """The generation a remote store's manifest names (its form was checked with the manifest)."""
    gen = manifest.get("data")
    if gen is None:
        raise ArtifactError(f"the manifest of {url} names no data generation (field 'data'): it was not written by an "
                            "rcengine prefill to object storage; re-run the prefill")
    return gen

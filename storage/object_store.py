"""Stores at ``s3://bucket/prefix`` URLs: S3 or any S3-compatible server (MinIO, Ceph, moto).

Layout under the prefix (``/`` is the delimiter, so ``s3://b/doc`` and ``s3://b/doc2`` are apart)::

    manifest.json          the commit point: the store's manifest (``manifest.py``), naming its data
    gen-<32 hex>/          one generation of the data: kv.zarr/..., *.safetensors, *.bin
    .rcengine-lock         the writer's lease (one writer per store)

Object stores have no rename, so a prefill writes a new generation next to the current one, then
the manifest, in one PUT, which names it: a reader gets the old manifest or the new one, never a
half-written document.  Then the old generation is removed.  A writer first takes the lease: an
exclusive create of ``.rcengine-lock`` (a conditional PUT, ``If-None-Match: *``), renewed while it
writes; a lease not renewed for LEASE_S seconds was left by a writer that died and is taken over
(a conditional PUT on its ETag, so two takers cannot both win).  Holding it, the writer removes the
generations the manifest does not name (interrupted uploads, or an old generation whose removal
was cut short) and checks that the prefix holds nothing else: objects rcengine did not make are
never replaced.  A writer whose lease was taken over refuses to commit.

Credentials and the endpoint come from botocore's usual sources (``AWS_ACCESS_KEY_ID``, profiles,
``AWS_ENDPOINT_URL`` for a server other than AWS).  Every request has a deadline
(``RCENGINE_S3_TIMEOUT_S``, default 20 s) and is retried with exponential backoff at most
``RCENGINE_S3_ATTEMPTS`` times in all (default 5; throttling included); what still fails becomes one
line (:func:`remote_errors`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from .checksums import CorruptChunkError
from .errors import ArtifactError, NotAStoreError, StoreBusyError
from .manifest import GENERATION, MANIFEST

SCHEME = "s3://"
LOCK = ".rcengine-lock"
LEASE_S = 60.0  # a lease older than this was left by a writer that died
RENEW_S = 10.0
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")


class ObjectStoreError(ArtifactError):
    """An object store that cannot be used as asked: unreachable, refusing, throttling, missing."""


def is_remote(location: object) -> bool:
    return isinstance(location, str) and location.startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``, checked: a valid bucket name and a prefix of
    plain names (a store is never a whole bucket)."""
    rest = url.removeprefix(SCHEME).rstrip("/")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"{url}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, dots, hyphens)")
    parts = prefix.split("/") if prefix else []
    if not parts or not all(_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise ValueError(f"{url}: a store is a prefix of plain names inside the bucket, e.g. s3://{bucket}/docs/report.rcs")
    return bucket, prefix


def settings() -> tuple[float, int]:
    """(seconds a request may take, attempts in all) from the environment."""
    try:
        timeout = float(os.environ.get("RCENGINE_S3_TIMEOUT_S", "20"))
        attempts = int(os.environ.get("RCENGINE_S3_ATTEMPTS", "5"))
    except ValueError:
        raise ValueError("RCENGINE_S3_TIMEOUT_S must be a number of seconds and RCENGINE_S3_ATTEMPTS a whole number") from None
    if not timeout > 0 or attempts < 1:
        raise ValueError("RCENGINE_S3_TIMEOUT_S must be > 0 and RCENGINE_S3_ATTEMPTS >= 1")
    return timeout, attempts


def storage_options() -> dict[str, Any]:
    """s3fs's options, for our own file system and zarr's: botocore retries (standard mode:
    exponential backoff with jitter, throttling included), s3fs's own loop once."""
    timeout, attempts = settings()
    where = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {**({"endpoint_url": where} if where else {}), "config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout, "max_pool_connections": 64,
                              "retries": {"mode": "standard", "total_max_attempts": attempts}}}


# What decides how a file system reaches the server (read from the environment at each call).
_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
        "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_DEFAULT_REGION", "AWS_REGION", "RCENGINE_S3_TIMEOUT_S",
        "RCENGINE_S3_ATTEMPTS")
_FILESYSTEMS: dict[tuple, Any] = {}
_FS_LOCK = threading.Lock()


def filesystem(asynchronous: bool = False):  # noqa: ANN201 (an s3fs.S3FileSystem)
    """Our s3fs file system (``asynchronous``: zarr's, used on its event loop); botocore retries,
    s3fs's own retry loop runs once.  One per process and environment (credentials, endpoint,
    deadlines), kept for the process: a client is closed on the event loop it was made on."""
    try:
        import s3fs
    except ImportError:
        raise ArtifactError("s3:// stores need s3fs: pip install 's3fs>=2024.6' (or rcengine[s3])") from None
    key = (asynchronous, os.getpid(), *(os.environ.get(k) for k in _ENV))
    with _FS_LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            if not _FILESYSTEMS:
                import zarr.core.sync  # noqa: F401 (its exit hook, which stops its loop, must run after ours)

                atexit.register(_close_all)
            fs = _FILESYSTEMS[key] = s3fs.S3FileSystem(asynchronous=asynchronous, skip_instance_cache=True, **storage_options())
            fs.retries = 1
    return fs


def _close_all() -> None:
    """Close the clients at exit, each on the event loop it was made on (else aiohttp warns of
    unclosed sessions)."""
    from fsspec.asyn import sync as fsspec_sync
    from zarr.core.sync import sync as zarr_sync

    for key, fs in list(_FILESYSTEMS.items()):
        client = getattr(fs, "_s3", None)
        if client is None or key[1] != os.getpid():
            continue
        with contextlib.suppress(Exception):
            if key[0]:
                zarr_sync(client.__aexit__(None, None, None))
            else:
                fsspec_sync(fs.loop, client.__aexit__, None, None, None, timeout=5)
    _FILESYSTEMS.clear()


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def describe(exc: BaseException, url: str) -> str | None:
    """One line for an error of reaching ``url``'s server, or None if ``exc`` is not one."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = {c.__name__ for x in chain for c in type(x).__mro__}
    code = next((x.response.get("Error", {}).get("Code", "") for x in chain if hasattr(x, "response")
                 and isinstance(getattr(x, "response", None), dict)), "")
    _, attempts = settings()
    where = f"the object store at {endpoint()}"
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return f"no AWS credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken") \
            or (not code and "PermissionError" in names):
        return f"{where} refused the credentials for {url} ({code or 'access denied'}): check AWS_ACCESS_KEY_ID and " \
               "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    if code == "NoSuchBucket":
        return f"bucket {split_url(url)[0]!r} does not exist at {endpoint()}: create it, or check the URL and AWS_ENDPOINT_URL"
    if code in ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "503"):
        return f"{where} kept throttling requests for {url} (SlowDown) after {attempts} attempts with backoff: retry later " \
               "(or raise RCENGINE_S3_ATTEMPTS)"
    timeouts = {"ReadTimeoutError", "ConnectTimeoutError", "TimeoutError", "ServerTimeoutError", "FSTimeoutError"}
    if names & timeouts:
        timeout, _ = settings()
        return f"{where} stopped answering for {url} (no reply within {timeout:g} s, {attempts} attempts): check the server " \
               "and AWS_ENDPOINT_URL, then retry"
    connection = {"EndpointConnectionError", "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError",
                  "ClientOSError", "ConnectionError", "HTTPClientError", "ProxyConnectionError"}
    if names & connection or isinstance(exc, ConnectionError):
        return f"cannot reach {where} for {url} (connection refused or lost after {attempts} attempts): check that it runs " \
               "and AWS_ENDPOINT_URL, then retry"
    if code:
        return f"{where} answered {code} for {url}: {str(exc).splitlines()[0][:160] if str(exc) else code}"
    return None


@contextlib.contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """Errors of reaching the server become one :class:`ObjectStoreError` line."""
    try:
        yield
    except (ArtifactError, CorruptChunkError):
        raise
    except Exception as e:
        line = describe(e, url)
        if line is None:
            raise
        raise ObjectStoreError(line) from None


def _etag(info: dict[str, Any]) -> str:
    return str(info.get("ETag") or info.get("etag") or "")


class RemoteLease:
    """The store's writer lease, held from construction until :meth:`release`; renewed on a thread.
    ``wait``: wait for another writer instead of refusing (``log`` says so)."""

    def __init__(self, fs, url: str, prefix: str, wait: bool = False, log: Callable[[str], None] | None = None) -> None:  # noqa: ANN001
        self.fs, self.url, self.path = fs, url, f"{prefix}/{LOCK}"
        self.token = uuid.uuid4().hex
        self._etag = ""
        self._lost = False
        self._stop = threading.Event()
        while not self._try_take():
            holder = self._holder()
            if not wait:
                raise StoreBusyError(f"{url} is being written by another process ({holder}): wait for it to finish (--wait, or "
                                     "wait=True) or choose another store")
            if log is not None:
                log(f"waiting for another process ({holder}) writing {url}")
                log = None
            time.sleep(1.0)
        self._thread = threading.Thread(target=self._renew, name="rcengine-lease", daemon=True)
        self._thread.start()

    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "renewed": time.time()}).encode()

    def _call(self, method: str, **kwargs: Any) -> tuple[dict[str, Any], bytes]:
        """One S3 call on s3fs's event loop -> (the response, the body read whole for a GET)."""
        from fsspec.asyn import sync as run

        bucket, key = self.path.split("/", 1)

        async def call() -> tuple[dict[str, Any], bytes]:
            out = await self.fs._call_s3(method, Bucket=bucket, Key=key, **kwargs)
            body = out.get("Body")
            return out, (await body.read() if body is not None else b"")

        return run(self.fs.loop, call)

    def _put(self, **cond: str) -> bool:
        """A conditional PUT of our lease -> whether it took (a failed precondition: no)."""
        try:
            out, _ = self._call("put_object", Body=self._body(), **cond)
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        self._etag = _etag(out)
        return True

    def _read(self) -> tuple[dict[str, Any], str] | None:
        try:
            out, data = self._call("get_object")
        except FileNotFoundError:
            return None
        try:
            held = json.loads(data)
            float(held["renewed"])
        except (ValueError, KeyError, TypeError):
            held = {"renewed": 0.0}
        return held, _etag(out)

    def _try_take(self) -> bool:
        if self._put(IfNoneMatch="*"):
            return True
        found = self._read()
        if found is None:
            return False  # released meanwhile: the next round takes it
        held, etag = found
        if time.time() - float(held["renewed"]) > LEASE_S and etag:
            return self._put(IfMatch=etag)  # a dead writer's lease: one taker wins
        return False

    def _holder(self) -> str:
        found = self._read()
        if found is None:
            return "a writer that has just finished"
        held, _ = found
        age = time.time() - float(held.get("renewed", 0.0))
        return f"pid {held.get('pid', '?')} on {held.get('host', '?')}, lease renewed {age:.0f} s ago"

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                if not self._put(IfMatch=self._etag):
                    self._lost = True
                    return
            except Exception:  # noqa: BLE001 (a missed renewal is retried; check_held decides)
                continue

    def check_held(self) -> None:
        """Refuse to commit when another writer has taken the lease over (ours lapsed)."""
        found = self._read()
        if self._lost or found is None or found[0].get("token") != self.token:
            raise StoreBusyError(f"the write lease of {self.url} lapsed and another writer took it over: nothing was "
                                 "committed; run the prefill again")

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=RENEW_S + 5)
        with contextlib.suppress(Exception):
            found = self._read()
            if found is not None and found[0].get("token") == self.token:
                self.fs.rm(self.path)


def _precondition_failed(e: BaseException) -> bool:
    """A conditional request the server refused (412, or 409 for a concurrent conditional write)."""
    if isinstance(e, FileExistsError):
        return True
    cause = e.__cause__
    response = getattr(cause, "response", None)
    code = response.get("Error", {}).get("Code", "") if isinstance(response, dict) else ""
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def require_bucket(fs, bucket: str) -> None:  # noqa: ANN001
    """The bucket exists, or one line: the server's own answer (NoSuchBucket, access denied) where
    it gives one."""
    if not fs.exists(bucket):
        fs.ls(bucket)
        raise ArtifactError(f"bucket {bucket!r} does not exist: create it, or check the URL and AWS_ENDPOINT_URL")


def listing(fs, prefix: str) -> tuple[bool, list[str], list[str]]:  # noqa: ANN001
    """What the prefix holds at its top: (a manifest, generation names, other entries)."""
    try:
        entries = fs.ls(prefix, detail=False, refresh=True)
    except FileNotFoundError:
        return False, [], []
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    gens = sorted(n for n in names if GENERATION.fullmatch(n))
    other = sorted(n for n in names if n not in (MANIFEST, LOCK) and not GENERATION.fullmatch(n))
    return MANIFEST in names, gens, other


def current_generation(fs, prefix: str) -> str | None:  # noqa: ANN001
    """The generation the committed manifest names (None: no readable manifest)."""
    try:
        data = fs.cat_file(f"{prefix}/{MANIFEST}")
        gen = json.loads(data).get("data")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return gen if isinstance(gen, str) and GENERATION.fullmatch(gen) else None


def generation_bytes(fs, path: str) -> int:  # noqa: ANN001
    return int(sum(fs.du(path, total=False).values())) if fs.exists(path) else 0


def check_target(fs, url: str, prefix: str, overwrite: bool) -> None:  # noqa: ANN001
    """A prefix a writer may fill: empty, or an rcengine store (with ``overwrite``); never one that
    holds objects rcengine did not make."""
    has_manifest, _, other = listing(fs, prefix)
    if other:
        raise NotAStoreError(f"{url} holds objects rcengine did not make ({other[0]!r}{' and more' if len(other) > 1 else ''}): "
                             "a prefill writes only to an empty prefix or an rcengine store; choose another prefix")
    if has_manifest and not overwrite:
        raise FileExistsError(f"a prefill artifact already exists at {url}: choose another store or overwrite it (--overwrite, "
                              "or overwrite=True)")


def new_generation() -> str:
    return f"gen-{uuid.uuid4().hex}"

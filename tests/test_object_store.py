"""Stores at s3:// URLs, against a local S3-compatible server (moto's server mode on the loopback
address, bench/scripts/s3_server.py) behind a proxy that misbehaves on demand: the same answers as a local
store, from another process too; ranged GETs metered apart; checksums verified; publishing that a
reader never sees half done; what interrupted writers leave, listed and reclaimed; each failure of
the server one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from rcengine import ArtifactError, CorruptChunkError, Engine, EngineConfig, NotAStoreError, SamplingConfig  # noqa: E402
from rcengine import ObjectStoreError, StoreBusyError, StoreReplacedError  # noqa: E402
from rcengine.cli.errors import user_errors  # noqa: E402
from rcengine.storage import ArtifactWriter, object_store, temporaries  # noqa: E402
from rcengine.storage.object_store import filesystem  # noqa: E402
from cli_run import rc  # noqa: E402
from rcengine.bench.scripts.s3_server import FaultProxy, start_moto  # noqa: E402
from tiny_models import TEXT, save_tiny_model  # noqa: E402

QUESTION = " What is the special magic number for apple?"
GREEDY = SamplingConfig(max_new_tokens=4)
DOC = TEXT * 5  # about 1,500 tokens: a whole KV chunk and a partial one


@pytest.fixture(scope="module")
def moto_url():
    server, url = start_moto()
    yield url
    server.stop()


@pytest.fixture
def s3(moto_url, monkeypatch):
    """(the proxy in front of the server, a new bucket); the environment points at the proxy."""
    proxy = FaultProxy(moto_url)
    for k, v in {"AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1", "RCENGINE_S3_TIMEOUT_S": "2", "RCENGINE_S3_ATTEMPTS": "3"}.items():
        monkeypatch.setenv(k, v)
    bucket = f"t{uuid.uuid4().hex[:12]}"
    filesystem().mkdir(bucket)
    yield proxy, bucket
    if proxy.hanging or proxy.denying:
        proxy.hanging = proxy.denying = False
    proxy.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("s3") / "llama", "llama", max_positions=4096)


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    cfg = EngineConfig(method="rc", budget=0.05, offload="disk", tail=16, selector="block")
    return Engine.load(model, cfg, device="cpu", show_progress=False)


@pytest.fixture
def stored(engine, s3) -> tuple[FaultProxy, str, str]:
    """(the proxy, the bucket, the URL of a document persisted there)."""
    proxy, bucket = s3
    url = f"s3://{bucket}/doc"
    engine.prefill(DOC, store=url).close()
    return proxy, bucket, url


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    assert text and "\n" not in text, repr(text)
    assert isinstance(e, user_errors())  # the CLI ends it with exit code 2
    return text


def test_a_prefill_to_s3_answers_in_another_process_with_the_local_stores_tokens(engine, model, s3, tmp_path):
    _, bucket = s3
    local = tmp_path / "doc.rcs"
    engine.prefill(DOC, store=local).close()
    with engine.open(local) as doc:
        want = doc.ask(QUESTION, GREEDY).token_ids
    url = f"s3://{bucket}/docs/doc.rcs"
    engine.prefill(DOC, store=url).close()
    assert sorted(p.rsplit("/", 1)[-1][:4] for p in filesystem().ls(f"{bucket}/docs/doc.rcs")) == ["gen-", "mani"]
    script = textwrap.dedent(f"""
        import json, rcengine
        cfg = rcengine.EngineConfig(method="rc", budget=0.05, tail=16, selector="block")
        engine = rcengine.Engine.load({str(model)!r}, cfg, device="cpu", show_progress=False)
        with engine.open({url!r}) as doc:
            answer = doc.ask({QUESTION!r}, rcengine.SamplingConfig(max_new_tokens=4))
        print(json.dumps({{"ids": answer.token_ids, "disk": answer.stats["bytes"]["by_tier"]["disk"]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ids"] == want
    assert got["disk"]["network"] == got["disk"]["physical"] > 0 and got["disk"]["network_gets"] > 0
    ran = rc("ask", url, QUESTION, "--model", str(model), "--max-new-tokens", "4", "--selector", "block", "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["new_tokens"] == len(want)


def test_steps_fetch_their_blocks_with_ranged_gets_metered_apart_and_a_warm_step_fetches_nothing(engine, stored):
    proxy, _, url = stored
    with engine.open(url) as doc:
        cold = doc.ask(QUESTION, GREEDY).stats["bytes"]["by_tier"]["disk"]
        before = proxy.gets
        warm = doc.ask(QUESTION, GREEDY).stats["bytes"]["by_tier"]["disk"]
        assert proxy.gets == before  # nothing reached the server
    assert cold["network"] == cold["physical"] > 0 and cold["network_gets"] == cold["block_cache_misses"] > 0
    assert cold["storage_device_read"] == 0  # nothing came from a local disk
    assert warm["network"] == warm["network_gets"] == warm["block_cache_misses"] == 0 and warm["block_cache_hits"] > 0
    assert warm["logical"] == cold["logical"]


def test_a_damaged_object_is_caught_by_its_checksum(engine, stored, model):
    _, bucket, url = stored
    fs = filesystem()
    (gen,) = [p for p in fs.ls(f"{bucket}/doc") if "/gen-" in p]
    chunk = sorted(p for p in fs.find(f"{gen}/kv.zarr") if "/L0/c" in p)[0]
    data = bytearray(fs.cat_file(chunk))
    for i in range(100, len(data), 512):  # a flipped bit in every block of it, whichever a step reads
        data[i] ^= 0x01
    fs.pipe_file(chunk, bytes(data))
    with engine.open(url) as doc, pytest.raises(CorruptChunkError) as e:
        doc.ask(QUESTION, GREEDY)
    assert "fails its checksum" in _one_line(e.value)
    ran = rc("info", "--store", url, "--verify", "--json")
    assert ran.returncode == 0 and "fails its checksum" in json.loads(ran.stdout)["store"]["error"]
    manifest = f"{bucket}/doc/manifest.json"
    fs.pipe_file(manifest, fs.cat_file(manifest).replace(b'"created":"2', b'"created":"3'))
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        engine.open(url)


def test_a_server_killed_midway_is_named_in_one_line(engine, stored):
    proxy, _, url = stored
    doc = engine.open(url)
    proxy.stop()
    with pytest.raises(ObjectStoreError) as e:
        doc.ask(QUESTION, GREEDY)
    assert "cannot reach the object store" in _one_line(e.value)
    doc.close()


def test_a_server_gone_during_a_prefill_is_named_and_what_it_left_is_reclaimed(engine, s3, moto_url, monkeypatch, tmp_path):
    proxy, bucket = s3
    url = f"s3://{bucket}/doc"
    monkeypatch.chdir(tmp_path)
    proxy.cut_after(12)  # the server goes away midway through the upload
    with pytest.raises(ObjectStoreError) as e:
        engine.prefill(DOC, store=url)
    assert "cannot reach the object store" in _one_line(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing local was written
    back = FaultProxy(moto_url)  # the server again, at another address
    monkeypatch.setenv("AWS_ENDPOINT_URL", back.url)
    try:
        (left,) = temporaries(url)  # the generation it could not remove
        ran = rc("info", "--store", url, "--json")
        assert [t["path"] for t in json.loads(ran.stdout)["store"]["temporaries"]] == [left.path]
        assert "an incomplete prefill artifact" in json.loads(ran.stdout)["store"]["error"]
        monkeypatch.setattr(object_store, "LEASE_S", 0.0)  # its lease, never renewed again, has lapsed
        engine.prefill(DOC, store=url).close()
        assert temporaries(url) == [] and not filesystem().exists(left.path.removeprefix("s3://"))
    finally:
        back.stop()


def test_a_server_that_stops_answering_is_named_in_one_line(engine, stored, monkeypatch):
    proxy, _, url = stored
    monkeypatch.setenv("RCENGINE_S3_TIMEOUT_S", "0.5")
    monkeypatch.setenv("RCENGINE_S3_ATTEMPTS", "2")
    doc = engine.open(url)
    proxy.hang()
    with pytest.raises(ObjectStoreError) as e:
        doc.ask(QUESTION, GREEDY)
    assert "stopped answering" in _one_line(e.value)
    doc.close()


def test_throttled_requests_are_retried_with_backoff_a_bounded_number_of_times(engine, s3):
    proxy, bucket = s3
    url = f"s3://{bucket}/doc"
    proxy.throttle(2)  # fewer than the 3 attempts: each throttled request succeeds on a retry
    engine.prefill(DOC, store=url).close()
    assert proxy.throttled == 0
    proxy.throttle(1000)
    before = proxy.requests
    with pytest.raises(ObjectStoreError) as e:
        engine.open(url)
    assert "kept throttling" in _one_line(e.value)
    assert proxy.requests - before == 3, proxy.paths[before:]  # RCENGINE_S3_ATTEMPTS, then it gives up
    proxy.throttle(0)
    with engine.open(url) as doc:
        assert doc.ask(QUESTION, GREEDY).new_tokens == 4


def test_wrong_or_missing_credentials_and_a_missing_bucket_are_named_in_one_line(engine, model, stored, monkeypatch, tmp_path):
    proxy, bucket, url = stored
    with pytest.raises(ObjectStoreError) as e:
        engine.open(f"s3://{bucket}-missing/doc")
    assert "does not exist" in _one_line(e.value)
    ran = rc("ask", f"s3://{bucket}-missing/doc", QUESTION, "--model", str(model))
    assert ran.returncode == 2 and ran.stderr.count("\n") == 1 and "does not exist" in ran.stderr, ran.stderr
    proxy.deny()
    with pytest.raises(ObjectStoreError) as e:
        engine.open(url)
    assert "refused the credentials" in _one_line(e.value)
    ran = rc("info", "--store", url, "--json")
    assert "refused the credentials" in json.loads(ran.stdout)["store"]["error"]
    proxy.denying = False
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ObjectStoreError) as e:
        engine.prefill(DOC, store=f"s3://{bucket}/other")
    assert "no AWS credentials" in _one_line(e.value)


def test_an_interrupted_upload_is_listed_never_opened_and_removed_by_the_next_prefill(engine, stored, monkeypatch):
    _, bucket, url = stored
    with engine.open(url) as doc:
        want = doc.ask(QUESTION, GREEDY).token_ids
    # A writer that dies midway leaves its lease and part of a generation (no manifest names it).
    dead = ArtifactWriter(url, overwrite=True)
    dead.put_bytes("anchors.safetensors", b"x" * 1000)
    dead.remote.lease._stop.set()
    (left,) = temporaries(url)
    assert left.path == f"s3://{dead.remote.root}" and left.bytes == 1000 and left.live
    listed = json.loads(rc("info", "--store", url, "--json").stdout)["store"]
    assert listed["healthy"] and listed["temporaries"] == [{"path": left.path, "bytes": 1000, "live": True}]
    with engine.open(url) as doc:  # readers see the committed document, never the half-written one
        assert doc.ask(QUESTION, GREEDY).token_ids == want
    with pytest.raises(StoreBusyError, match="being written by another process"):
        engine.prefill(DOC, store=url, overwrite=True)
    monkeypatch.setattr(object_store, "LEASE_S", 0.0)  # the dead writer's lease has lapsed
    engine.prefill(DOC + " More.", store=url, overwrite=True).close()
    assert temporaries(url) == []
    fs = filesystem()
    assert not fs.exists(dead.remote.root)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/doc", refresh=True))
    assert len(names) == 2 and names[0].startswith("gen-") and names[1] == "manifest.json"  # no lease, one generation
    with pytest.raises(StoreBusyError, match="lapsed"):
        dead.remote.lease.check_held()  # the dead writer could not commit now


def test_a_reader_of_a_replaced_store_is_told_so(engine, stored):
    *_, url = stored
    doc = engine.open(url)
    engine.prefill(DOC + " Again.", store=url, overwrite=True).close()
    with pytest.raises(StoreReplacedError) as e:
        doc.ask(QUESTION, GREEDY)
    assert "was replaced" in _one_line(e.value)
    doc.close()


def test_objects_rcengine_did_not_make_are_never_replaced(engine, s3):
    _, bucket = s3
    fs = filesystem()
    fs.pipe_file(f"{bucket}/mine/notes.txt", b"keep me")
    with pytest.raises(NotAStoreError) as e:
        engine.prefill(DOC, store=f"s3://{bucket}/mine", overwrite=True)
    assert "rcengine did not make" in _one_line(e.value)
    assert fs.ls(f"{bucket}/mine", refresh=True) == [f"{bucket}/mine/notes.txt"] and fs.cat_file(f"{bucket}/mine/notes.txt") == b"keep me"
    engine.prefill(DOC, store=f"s3://{bucket}/fresh").close()
    with pytest.raises(FileExistsError, match="already exists"):
        engine.prefill(DOC, store=f"s3://{bucket}/fresh")

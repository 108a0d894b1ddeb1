"""Stores never destroy what is not theirs, never answer from an edited manifest, never hang.

In-process where no real process is needed (the engine on a tiny model, the CLI through typer's
runner); real processes for the races: two writers of one store, a replacement while a reader
reads, a replacement killed between its renames, a FIFO in place of a chunk."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import rcengine
from rcengine import ArtifactError, CorruptChunkError, Engine, EngineConfig, NotAStoreError, SamplingConfig, StoreBusyError
from rcengine.cli.errors import user_errors
from rcengine.storage import ArtifactWriter, Artifact, reclaim_stale, temporaries
from rcengine.storage.checksums import crc32c_hex
from rcengine.storage.manifest import seal
from tiny_models import TEXT, save_tiny_model

QUESTION = " What is the special magic number for apple?"
GREEDY = SamplingConfig(max_new_tokens=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("safety") / "llama", "llama", max_positions=4096)


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    return Engine.load(model, EngineConfig(method="rc", budget=0.05, offload="disk", tail=16), device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def store(engine, tmp_path_factory) -> tuple[Path, str]:
    """A persisted document of about 1,500 tokens (a whole KV chunk and a partial one) and the
    answer it gives."""
    path = tmp_path_factory.mktemp("safety-store") / "doc.rcs"
    engine.prefill(TEXT * 5, store=path).close()
    with engine.open(path) as doc:
        return path, doc.ask(QUESTION, GREEDY).text


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    assert text and "\n" not in text, repr(text)
    return text


# -- only a store is ever replaced ----------------------------------------------------------------


def test_a_users_folder_the_current_folder_and_home_are_never_written(engine, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(NotAStoreError, match="notes.txt"):
        engine.prefill(TEXT, store=mine)
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    monkeypatch.chdir(mine)
    for spelled in (".", "..", str(mine), str(tmp_path)):
        with pytest.raises(NotAStoreError, match="current folder"):
            engine.prefill(TEXT, store=spelled)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(NotAStoreError, match="home folder"):
        engine.prefill(TEXT, store=tmp_path / "home")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile"):
        engine.prefill(TEXT, store=tmp_path / "afile", overwrite=True)
    os.symlink(tmp_path / "home", tmp_path / "link")
    with pytest.raises(NotAStoreError, match="symbolic link"):
        engine.prefill(TEXT, store=tmp_path / "link", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep" and (tmp_path / "afile").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "home", "link", "mine"]


def test_an_empty_folder_becomes_a_store_and_a_store_with_a_users_file_is_kept(engine, tmp_path):
    (tmp_path / "empty").mkdir()
    engine.prefill(TEXT, store=tmp_path / "empty").close()
    Artifact.open(tmp_path / "empty")
    with pytest.raises(FileExistsError, match="--overwrite"):
        engine.prefill(TEXT, store=tmp_path / "empty")
    (tmp_path / "empty" / "kv.zarr" / "mine.txt").write_text("keep")
    with pytest.raises(NotAStoreError, match="kv.zarr/mine.txt"):
        engine.prefill(TEXT, store=tmp_path / "empty", overwrite=True)
    assert (tmp_path / "empty" / "kv.zarr" / "mine.txt").read_text() == "keep"
    (tmp_path / "empty" / "kv.zarr" / "mine.txt").unlink()
    engine.prefill(TEXT * 2, store=tmp_path / "empty", overwrite=True).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing left beside it: no lock, temporary or old store


def test_a_file_appearing_in_an_empty_folder_during_the_prefill_is_kept(engine, tmp_path, monkeypatch):
    (tmp_path / "doc").mkdir()
    real = ArtifactWriter._publish

    def publish(self, root, final):  # noqa: ANN001
        (final / "late.txt").write_text("keep")
        real(self, root, final)

    monkeypatch.setattr(ArtifactWriter, "_publish", publish)
    with pytest.raises(NotAStoreError, match="late.txt"):
        engine.prefill(TEXT, store=tmp_path / "doc")
    assert [p.name for p in (tmp_path / "doc").iterdir()] == ["late.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc"]


# -- one writer per store ---------------------------------------------------------------------------


def test_a_second_writer_is_refused_by_name_or_waits(tmp_path):
    first = ArtifactWriter(tmp_path / "doc")
    with pytest.raises(StoreBusyError, match=f"process {os.getpid()}"):
        ArtifactWriter(tmp_path / "doc")
    assert [t.live for t in temporaries(tmp_path / "doc")] == [True]
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            ArtifactWriter(tmp_path / "doc", wait=True)
        except BaseException as e:  # noqa: BLE001 (reported to the test below)
            outcome.append(e)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()  # waiting for the first writer
    first.put_bytes("x.bin", b"123")
    first.commit({"m": 1}, {}, {})
    thread.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], FileExistsError)  # then sees the store, without overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc"]


_PREFILL = [sys.executable, "-m", "rcengine.cli.app", "prefill"]


def test_two_prefills_of_one_new_store_leave_one_store_and_one_refusal(model, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT * 6)
    (tmp_path / "b.txt").write_text(TEXT * 3)
    procs = [subprocess.Popen([*_PREFILL, str(tmp_path / name), "--store", str(tmp_path / "doc"), "--model", str(model),
                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a.txt", "b.txt")]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outs
    winner = json.loads(outs[codes.index(0)][0])
    loser = outs[codes.index(2)][1].strip()
    assert "Traceback" not in loser and len(loser.splitlines()) == 1 and ("another process" in loser or "already exists" in loser)
    assert Artifact.open(tmp_path / "doc").meta["tokens"] == winner["tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "doc"]


# -- replacing ----------------------------------------------------------------------------------------

_READER = textwrap.dedent(
    """
    import sys
    import rcengine
    engine = rcengine.Engine.load(sys.argv[1], rcengine.EngineConfig(method="rc", budget=0.05, tail=16, cache_bytes=0),
                                  device="cpu", show_progress=False)
    doc = engine.open(sys.argv[2])
    print("open", flush=True)
    sys.stdin.readline()
    try:
        print("answer", doc.ask(sys.argv[3], rcengine.SamplingConfig(max_new_tokens=4)).text, flush=True)
    except rcengine.ArtifactError as e:
        print("error", e, flush=True)
    """
)


def test_a_reader_of_a_replaced_store_is_told_so(engine, model, tmp_path):
    engine.prefill(TEXT * 5, store=tmp_path / "doc").close()
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(model), str(tmp_path / "doc"), QUESTION], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "open"
    engine.prefill("Another document. " + TEXT * 5, store=tmp_path / "doc", overwrite=True).close()  # other bytes from its start
    out, err = reader.communicate("go\n", timeout=120)
    assert reader.returncode == 0, err
    assert out.startswith("error") and "was replaced" in out and "corrupt" not in out, out


_KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import rcengine
    import rcengine.storage.artifact as artifact
    calls = []
    real_rename = os.rename
    def rename(src, dst):
        calls.append(src)
        if ".old-" in str(dst):
            real_rename(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)  # the old store is aside, the new one not yet in place
        real_rename(src, dst)
    artifact.os.rename = rename
    engine = rcengine.Engine.load(sys.argv[1], rcengine.EngineConfig(offload="disk", tail=16), device="cpu", show_progress=False)
    engine.prefill(sys.argv[3] * 6, store=sys.argv[2], overwrite=True)
    """
)


def test_a_replacement_killed_between_its_renames_is_put_back_by_the_next_writer(engine, model, tmp_path):
    engine.prefill(TEXT * 5, store=tmp_path / "doc").close()
    tokens = Artifact.open(tmp_path / "doc").meta["tokens"]
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(model), str(tmp_path / "doc"), TEXT], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "doc").exists()
    (old,) = [t for t in temporaries(tmp_path / "doc") if ".old-" in t.path.name]
    assert not old.live
    with pytest.raises(ArtifactError, match="previous artifact is at .*old-"):
        Artifact.open(tmp_path / "doc")
    restored = reclaim_stale(tmp_path / "doc")  # what the next prefill or generate does first
    assert [t.restored for t in restored if ".old-" in t.path.name] == [True]
    assert Artifact.open(tmp_path / "doc").meta["tokens"] == tokens
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".doc.")]


# -- no hang -------------------------------------------------------------------------------------------


def test_a_fifo_in_place_of_a_chunk_is_named_and_nothing_waits(model, store, tmp_path):
    copy_ = tmp_path / "doc"
    shutil.copytree(store[0], copy_)
    chunk = next(p for p in sorted((copy_ / "kv.zarr").rglob("c*")) if p.is_file())
    chunk.unlink()
    os.mkfifo(chunk)
    t0 = time.monotonic()
    out = subprocess.run(["timeout", "120", sys.executable, "-m", "rcengine.cli.app", "ask", str(copy_), QUESTION, "--model",
                          str(model), "--device", "cpu"], capture_output=True, text=True)
    assert out.returncode == 2 and "a FIFO" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert time.monotonic() - t0 < 100
    health = rcengine.store_health(copy_)
    assert not health["healthy"] and "FIFO" in health["error"]


# -- the manifest and the KV metadata are verified like the data ----------------------------------


def _leaves(value, path=()):  # noqa: ANN001, ANN202 (JSON paths to every value, a few of each big map)
    yield path
    if isinstance(value, dict):
        keys = sorted(value)
        if len(keys) > 6:  # kv_checksums: a few keys of each kind
            keys = keys[:2] + [k for k in keys if "@" in k][:2] + keys[-2:]
        for k in keys:
            yield from _leaves(value[k], (*path, k))
    elif isinstance(value, list):
        for i in range(min(len(value), 2)):
            yield from _leaves(value[i], (*path, i))


def _mutated(value, how: str, draw: int):  # noqa: ANN001, ANN202
    if how == "type":
        return {int: "7", float: "1.5", str: 7, bool: "true", dict: [], list: {}, type(None): 0}.get(type(value), None)
    if how == "absurd":
        return [1 << 40, -1, 10**30, "x" * 5000, 1e300][draw % 5]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + (1 if draw % 2 else -1)
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "x"
    if isinstance(value, list):
        return value[:-1]
    if isinstance(value, dict):
        return {**value, "zz": 1}
    return 1


_FILES = ("manifest.json", "kv.zarr/zarr.json", "kv.zarr/L1/zarr.json", "kv.zarr/P0/zarr.json")


@settings(max_examples=int(os.environ.get("EDITS", 120)), derandomize=os.environ.get("EDITS") is None, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_edit_of_the_manifest_or_kv_metadata_is_refused_in_one_line_or_changes_nothing(engine, store, tmp_path_factory, data):
    src, original = store
    doc = tmp_path_factory.mktemp("edit") / "doc.rcs"
    shutil.copytree(src, doc)
    target = data.draw(st.sampled_from(_FILES), label="file")
    text = json.loads((doc / target).read_text())
    path = data.draw(st.sampled_from([p for p in _leaves(text) if p]), label="path")
    how = data.draw(st.sampled_from(["change", "remove", "type", "absurd"]), label="how")
    parent = text
    for k in path[:-1]:
        parent = parent[k]
    if how == "remove":
        del parent[path[-1]]
    else:
        parent[path[-1]] = _mutated(copy.deepcopy(parent[path[-1]]), how, data.draw(st.integers(0, 9), label="draw"))
    (doc / target).write_text(json.dumps(text))
    manifest = json.loads((doc / "manifest.json").read_text())
    consistent = data.draw(st.booleans(), label="checksums updated")
    if consistent:  # as an editor who knows the format would: every checksum made to match
        if target != "manifest.json":
            manifest["kv_checksums"][target.removeprefix("kv.zarr/")] = crc32c_hex((doc / target).read_bytes())
        manifest.pop("checksum", None)
        (doc / "manifest.json").write_text(seal(manifest))
    try:
        with engine.open(doc) as reopened:
            answer = reopened.ask(QUESTION, GREEDY).text
    except (ArtifactError, CorruptChunkError, FileNotFoundError) as e:  # stored data refused, in words of its own
        event(f"refused: {type(e).__name__}: {_one_line(e).split(':')[0][:40]}")
        return
    event("same answer")
    assert answer == original, (target, path, how, consistent)


def test_a_copy_of_the_model_in_another_folder_opens_a_store(model, store, tmp_path):
    renamed = tmp_path / "renamed-model"
    shutil.copytree(model, renamed)
    again = Engine.load(renamed, EngineConfig(method="rc", budget=0.05, tail=16), device="cpu", show_progress=False)
    with again.open(store[0]) as doc:
        assert doc.ask(QUESTION, GREEDY).text == store[1]


def test_a_store_that_lost_its_kv_is_not_healthy(store, tmp_path):
    shutil.copytree(store[0], tmp_path / "doc")
    assert rcengine.store_health(tmp_path / "doc", verify=True)["healthy"]
    chunk = next(p for p in sorted((tmp_path / "doc" / "kv.zarr").rglob("c*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    assert rcengine.store_health(tmp_path / "doc")["healthy"]  # opening reads no chunk
    flipped = rcengine.store_health(tmp_path / "doc", verify=True)
    assert not flipped["healthy"] and "checksum" in flipped["error"]
    shutil.rmtree(tmp_path / "doc" / "kv.zarr")
    report = rcengine.store_health(tmp_path / "doc")
    assert not report["healthy"] and "missing" in report["error"]


# -- bounded resources and the API's types ---------------------------------------------------------


def test_the_api_refuses_wrong_types_in_one_line(engine, store):
    vocab = engine.vocab_size
    for bad, error in ((b"bytes", TypeError), (None, TypeError), ([1, vocab], ValueError), ([1, -2], ValueError),
                       ([1.5], TypeError), ("   \n", ValueError), ([], ValueError), (3, TypeError)):
        with pytest.raises(error) as e:
            engine.prefill(bad)
        _one_line(e.value)
    with pytest.raises(TypeError):
        engine.prefill(TEXT, store=7)
    with pytest.raises(TypeError):
        engine.prefill(TEXT, overwrite="yes")
    for kw in ({"temperature": float("nan")}, {"top_p": float("nan")}, {"seed": 10**23}, {"max_new_tokens": 0}, {"stop": "x"}):
        with pytest.raises(ValueError):
            SamplingConfig(**kw)
    with engine.open(store[0]) as doc:
        for bad in ("  ", b"x", None, [vocab]):
            with pytest.raises((TypeError, ValueError)) as e:
                doc.ask(bad, GREEDY)
            _one_line(e.value)


def test_a_cache_larger_than_the_store_is_capped_and_one_larger_than_memory_refused(engine, store, monkeypatch):
    from rcengine.storage import block_pool

    with engine.open(store[0]) as doc:
        assert doc.state.tier.cache.capacity_bytes <= 8 << 20  # asked for the default 512 MiB: the store is far smaller
    monkeypatch.setattr(block_pool.psutil, "virtual_memory", lambda: type("M", (), {"available": 1 << 10})())
    with pytest.raises(ValueError, match="available memory"):
        engine.open(store[0])


# -- the command line: errors before work, bounded reads ----------------------------------------------


def _cli(*args: str):  # noqa: ANN202 (click's Result)
    from typer.testing import CliRunner

    from rcengine.cli.app import app

    return CliRunner().invoke(app, list(args))


def _refused(result, fragment: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_the_cli_checks_before_it_works_and_reads_no_more_than_fits(model, store, tmp_path):
    (tmp_path / "afile").write_text("x")
    t0 = time.monotonic()
    _refused(_cli("calibrate", "--model", str(model), "--text", str(tmp_path / "afile"), "--out", str(tmp_path / "afile" / "maps")),
             "is a file")
    _refused(_cli("calibrate", "--model", str(model), "--text", str(tmp_path), "--out", str(tmp_path / "maps")), "is a folder")
    assert time.monotonic() - t0 < 10  # refused before the model loads or anything is captured
    _refused(_cli("generate", "--prompt-file", "/dev/zero", "--model", str(model), "--device", "cpu"), "longer than the model's")
    _refused(_cli("generate", TEXT, "--model", str(model), "--device", "cpu", "--store", str(store[0])), "--overwrite")
    _refused(_cli("generate", TEXT, "--model", str(model), "--device", "cpu", "--seed", str(10**23)), "seed")
    _refused(_cli("info", "--verify"), "--store")
    report = json.loads(_cli("info", "--json", "--store", str(store[0]), "--verify").stdout)["store"]
    assert report["healthy"] and report["verified"] and report["tokens"] > 1000
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "manifest.json").write_bytes(bytes(range(256)))
    (tmp_path / "folder" / "manifest.json").mkdir(parents=True)
    for bad, fragment in ((tmp_path / "binary", "not valid JSON"), (tmp_path / "folder", "a folder"),
                          (tmp_path / "afile" / "store", "a file"), (tmp_path / "none", "no prefill artifact")):
        result = _cli("info", "--json", "--store", str(bad))
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)["store"]
        assert not report["healthy"] and fragment in report["error"], report


def test_plain_chunks_are_recognised_whichever_way_zarr_spells_the_byte_order():
    """zarr before 3.2 gives the bytes codec's byte order as an enum, later releases as a string
    (the GPU machine's 3.4 among them)."""
    import enum

    from rcengine.storage.kv_metadata import _little_endian

    Endian = enum.Enum("Endian", {"little": "little", "big": "big"})  # noqa: N806
    codec = lambda endian: type("BytesCodec", (), {"endian": endian})()  # noqa: E731
    assert _little_endian(codec("little")) and _little_endian(codec(Endian.little))
    assert not _little_endian(codec("big")) and not _little_endian(codec(Endian.big)) and not _little_endian(codec(None))
    assert not _little_endian(type("ShardingCodec", (), {"endian": "little"})())

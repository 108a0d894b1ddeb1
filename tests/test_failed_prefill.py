"""A prefill to disk that cannot finish: a file system without room for the store (refused before
the prefill, or named when it fills up midway), or an interruption while writer threads are still
at work.  Nothing is left behind, and a store being replaced survives."""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rcengine import Engine, EngineConfig, NoSpaceError, SamplingConfig
from rcengine.cli.app import app
from rcengine.storage import DiskTier, space
from rcengine.storage.chunk_files import ChunkFiles
from rcengine.storage.space import ensure_room, free_bytes, is_no_room
from tiny_models import save_tiny_model

PROMPT = "Rivers run to the sea, and the sea is never full. " * 12
LONG = PROMPT * 12  # over one chunk file (1,024 tokens) a layer: written by the writer threads


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("nospace") / "llama", "llama", max_positions=4096)


def _engine(model: Path, tmp_path: Path, offload: str = "disk") -> Engine:
    return Engine.load(model, EngineConfig(method="rc", budget=0.1, tail=16, offload=offload, scratch_dir=str(tmp_path / "scratch")),
                       show_progress=False)


def _tight(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """The file system reports ``free`` bytes free."""
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(space.shutil, "disk_usage", lambda _path: usage._replace(free=free))


def _full_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    """The file system fills up after ``writes`` vectored writes (the chunk files')."""
    real, count = os.writev, [0]

    def writev(fd: int, buffers):  # noqa: ANN001, ANN202
        count[0] += 1
        if count[0] > writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_room_is_read_from_the_nearest_existing_folder(tmp_path):
    assert free_bytes(tmp_path / "not" / "yet") == shutil.disk_usage(tmp_path).free
    assert free_bytes("s3://bucket/store") is None
    ensure_room(tmp_path / "store", 1, "a store")
    with pytest.raises(NoSpaceError, match=r"a store needs about .* at .*store, and that file system has .* free"):
        ensure_room(tmp_path / "store", 1 << 62, "a store")
    assert is_no_room(RuntimeError("wrapped").with_traceback(None)) is False
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as e:
            raise RuntimeError("a writer failed") from e
    except RuntimeError as e:
        assert is_no_room(e)


def test_a_store_that_cannot_fit_is_refused_before_the_prefill(model, tmp_path, monkeypatch):
    engine = _engine(model, tmp_path)
    _tight(monkeypatch, free=1000)
    with pytest.raises(NoSpaceError, match="needs about"):
        engine.prefill(PROMPT, store=tmp_path / "store")
    with pytest.raises(NoSpaceError, match="scratch KV store"):
        engine.prefill(PROMPT)
    assert _leftovers(tmp_path) == []
    _engine(model, tmp_path, offload="cpu").prefill(PROMPT).close()  # nothing on disk: not checked
    monkeypatch.undo()
    engine.prefill(PROMPT).close()  # with room: the scratch folder is made, and its store removed with the document
    assert _leftovers(tmp_path) == ["scratch"] and _leftovers(tmp_path / "scratch") == []


@pytest.mark.parametrize("persisted", [True, False])
def test_a_file_system_that_fills_up_midway_is_named_and_nothing_is_kept(model, tmp_path, monkeypatch, persisted):
    engine = _engine(model, tmp_path)
    store = tmp_path / "store" if persisted else None
    if persisted:  # an older store at the same place, being replaced
        engine.prefill("An older document. " * 20, store=store).close()
    (tmp_path / "scratch").mkdir(exist_ok=True)
    before = _leftovers(tmp_path)
    assert len(engine.tokenize(LONG)) > 1024
    _full_after(monkeypatch, writes=1)
    with pytest.raises(NoSpaceError, match="filled up while the (store|scratch KV store) of .* tokens was written"):
        engine.prefill(LONG, store=store, overwrite=True)
    monkeypatch.undo()
    assert _leftovers(tmp_path) == before  # no temporary folder, lock or scratch store
    assert _leftovers(tmp_path / "scratch") == []
    if persisted:  # the old store still opens and answers
        answer = engine.open(store).ask(" The", SamplingConfig(max_new_tokens=2))
        assert answer.stats["decode_steps"] >= 1


def test_cli_says_so_in_one_line(model, tmp_path, monkeypatch):
    doc = tmp_path / "doc.txt"
    doc.write_text(PROMPT)
    _tight(monkeypatch, free=1000)
    out = CliRunner().invoke(app, ["prefill", str(doc), "--store", str(tmp_path / "store"), "--model", str(model), "--tail", "16"])
    assert out.exit_code == 2
    lines = out.output.strip().splitlines()
    assert lines[-1].startswith("error: the store of ") and "free some space there or choose another location" in lines[-1]
    assert "Traceback" not in out.output
    assert not (tmp_path / "store").exists()


def test_the_room_asked_for_is_what_the_store_takes(model, tmp_path):
    engine = _engine(model, tmp_path)
    store = tmp_path / "store"
    engine.prefill(LONG, store=store).close()
    taken = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    asked = engine._store_bytes(len(engine.tokenize(LONG)))
    assert taken <= asked <= 1.05 * taken + (1 << 20)  # the estimate's slack for the small files


@pytest.mark.parametrize("persisted", [True, False])
def test_an_interrupted_prefill_stops_its_writers_before_removing_their_folder(model, tmp_path, monkeypatch, persisted):
    """The writer threads still have chunk files to write (each first waits 0.3 s) when the prefill
    is interrupted; a write that ran after the folder's removal would create it again."""
    engine = _engine(model, tmp_path)
    write = ChunkFiles.write

    def slow_write(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        time.sleep(0.3)
        return write(self, *args, **kwargs)

    def interrupted(self):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(ChunkFiles, "write", slow_write)
    monkeypatch.setattr(DiskTier, "flush", interrupted)
    (tmp_path / "scratch").mkdir()
    with pytest.raises(KeyboardInterrupt):
        engine.prefill(LONG, store=tmp_path / "store" if persisted else None)
    time.sleep(0.6)  # any write still running would have recreated its folder by now
    assert _leftovers(tmp_path) == ["scratch"] and _leftovers(tmp_path / "scratch") == []


@pytest.mark.parametrize("where", ["document", "runner", "scratch"])
def test_a_signal_at_a_hand_off_leaves_no_scratch_store(model, tmp_path, monkeypatch, where):
    """SIGTERM becomes SystemExit between any two statements of the main thread: here it lands
    where the scratch store passes from the prefill to its document (before the document's
    finalizer exists, or while it builds its step runner), or just after the scratch folder is
    made.  Every hand-off has an owner that removes folder and lock (issue 24's race: under load a
    terminated generate left ``rcengine-kv-*`` behind)."""
    import rcengine.engine.qa.document as document
    import rcengine.engine.qa.engine as engine_module
    temporaries = importlib.import_module("rcengine.storage.temporaries")  # the package exports a function of that name

    def interrupted(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise SystemExit(143)

    if where == "document":
        finalize = document.weakref.finalize

        def finalize_unless_document(obj, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if isinstance(obj, document.Document):
                raise SystemExit(143)  # before the document owns anything
            return finalize(obj, *args, **kwargs)

        monkeypatch.setattr(document.weakref, "finalize", finalize_unless_document)
    elif where == "runner":
        monkeypatch.setattr(document, "StepRunner", interrupted)
    else:
        made = temporaries.Scratch.__init__

        def init_then_interrupted(self, parent=None):  # noqa: ANN001, ANN202
            made(self, parent)
            raise SystemExit(143)  # the object never reaches the prefill's variable

        monkeypatch.setattr(temporaries.Scratch, "__init__", init_then_interrupted)
        monkeypatch.setattr(engine_module, "Scratch", temporaries.Scratch)
    engine = _engine(model, tmp_path)
    (tmp_path / "scratch").mkdir()
    with pytest.raises(SystemExit):
        engine.prefill(PROMPT)
    monkeypatch.undo()
    import gc

    gc.collect()  # what only a finalizer owns is released when the object goes
    assert _leftovers(tmp_path / "scratch") == []


def test_a_folder_is_removed_after_zarrs_operations_still_running_in_it(tmp_path):
    """An operation a caller stopped waiting for (interrupted by a signal) runs on on zarr's event
    loop and, finishing after a removal, made the folder again (under load, a terminated generate
    left ``rcengine-kv-*/kv.zarr`` behind).  The removal waits for it first."""
    import asyncio

    import zarr
    from zarr.core.sync import _get_loop

    from rcengine.storage.temporaries import remove_tree

    zarr.create_group(zarr.storage.LocalStore(tmp_path / "warm"))  # zarr's loop runs, as in any prefill to disk
    folder = tmp_path / "scratch"
    folder.mkdir()

    async def late_write() -> None:
        await asyncio.sleep(0.3)
        (folder / "kv.zarr").mkdir(parents=True)  # what a group still being created does

    asyncio.run_coroutine_threadsafe(late_write(), _get_loop())  # nobody waits for it
    remove_tree(folder)
    time.sleep(0.6)
    assert not folder.exists()

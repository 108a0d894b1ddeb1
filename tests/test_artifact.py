"""Persisted prefills: round trip, corruption, truncation, interrupted writes, model mismatch,
concurrent readers."""

from __future__ import annotations

import re

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rcengine.storage.artifact import FORMAT_VERSION
from rcengine.storage import (
    Artifact,
    ArtifactError,
    ArtifactWriter,
    CorruptChunkError,
    DiskTier,
    IndexSpec,
    KeyIndex,
    ModelMismatchError,
    Scratch,
    TierLayout,
    reclaim_stale_scratch,
    stale_scratch,
    temporaries,
)

LAYOUT = TierLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
MODEL = {"name": "tiny-llama", "config": {"layers": 2}, "weights": {"model.safetensors": [123, "abc"]}}


def write_artifact(location, seed: int = 0, overwrite: bool = False, rows: int = 50) -> dict:
    """Write a small artifact; return what it holds, for comparison."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 2, rows, 8, generator=gen).to(torch.bfloat16)
    v = torch.randn(2, 2, rows, 8, generator=gen).to(torch.bfloat16)
    anchors = {"k0": torch.randn(2, 4, 8, generator=gen)}
    index = KeyIndex(IndexSpec("flat"), 2, 2, 8)
    with ArtifactWriter(location, overwrite=overwrite) as w:
        tier = DiskTier.create(w.kv_location, LAYOUT, block_tokens=16, chunk_tokens=32)  # a whole chunk and a partial one
        for layer in range(2):
            tier.append(layer, k[layer], v[layer], torch.arange(rows) + 4)
            index.add(layer, k[layer])
        tier.flush()
        w.put_tensors("anchors", anchors)
        w.put_bytes("index-L1-H0.bin", index.serialize(1, 0))
        w.commit(MODEL, {"tokens": rows + 8, "sink": 4, "tail": 4}, tier.checksums, model_name="tiny-llama")
    return {"k": k, "v": v, "anchors": anchors}


def test_round_trip(tmp_path):
    ref = write_artifact(tmp_path / "doc")
    art = Artifact.open(tmp_path / "doc", expect_fingerprint=MODEL)
    assert art.meta == {"tokens": 58, "sink": 4, "tail": 4}
    assert torch.equal(art.read_tensors("anchors")["k0"], ref["anchors"]["k0"])
    tier = DiskTier.open(art.kv_location, checksums=art.kv_checksums)
    k, v = tier.gather(1, torch.arange(50).repeat(2, 1))
    assert torch.equal(k.view(torch.int16), ref["k"][1].view(torch.int16))
    index = KeyIndex(IndexSpec("flat"), 2, 2, 8)
    index.load(1, 0, art.read_bytes("index-L1-H0.bin"))
    assert index.num_rows(1, 0) == 50
    assert not list(tmp_path.glob(".doc.tmp-*"))  # nothing left beside it


def _chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "kv.zarr").rglob("*") if p.is_file() and p.name.startswith("c."))


def _flip(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_kv_chunk_is_reported_by_name(tmp_path):
    write_artifact(tmp_path / "doc")
    chunk = _chunk_files(tmp_path / "doc")[1]
    _flip(chunk, 7)
    art = Artifact.open(tmp_path / "doc")
    key = str(chunk.relative_to(tmp_path / "doc" / "kv.zarr"))
    layer = int(key.split("/")[0][1:])
    # a whole chunk's blocks are verified as they are read; a partial chunk is read at open
    with pytest.raises(CorruptChunkError, match=f"chunk '{re.escape(key)}"):
        tier = DiskTier.open(art.kv_location, checksums=art.kv_checksums)
        tier.gather(layer, torch.arange(50).repeat(2, 1))


def test_flipped_and_truncated_files_are_refused(tmp_path):
    write_artifact(tmp_path / "doc")
    _flip(tmp_path / "doc" / "anchors.safetensors", 100)
    with pytest.raises(CorruptChunkError, match="anchors.safetensors"):
        Artifact.open(tmp_path / "doc").read_tensors("anchors")
    path = tmp_path / "doc" / "index-L1-H0.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptChunkError, match="index-L1-H0.bin"):
        Artifact.open(tmp_path / "doc").read_bytes("index-L1-H0.bin")


def test_truncated_chunk_and_altered_metadata(tmp_path):
    write_artifact(tmp_path / "doc")
    chunk = _chunk_files(tmp_path / "doc")[0]
    chunk.write_bytes(chunk.read_bytes()[:100])
    art = Artifact.open(tmp_path / "doc")
    with pytest.raises(CorruptChunkError, match="chunk"):
        tier = DiskTier.open(art.kv_location, checksums=art.kv_checksums)
        for layer in range(2):
            tier.gather(layer, torch.arange(50).repeat(2, 1))
    meta = tmp_path / "doc" / "kv.zarr" / "zarr.json"
    meta.write_text(meta.read_text().replace('"block_tokens": 16', '"block_tokens": 17'))
    with pytest.raises(CorruptChunkError, match="zarr.json"):
        DiskTier.open(art.kv_location, checksums=art.kv_checksums)


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="no prefill artifact"):
        Artifact.open(tmp_path / "nothing")
    (tmp_path / "a.txt").write_text("not a store")
    with pytest.raises(ArtifactError, match="a.txt is a file, not a prefill artifact"):
        Artifact.open(tmp_path / "a.txt")
    write_artifact(tmp_path / "doc")
    manifest = tmp_path / "doc" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Artifact.open(tmp_path / "doc")
    manifest.write_text(json.dumps({**json.loads(text), "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        Artifact.open(tmp_path / "doc")
    manifest.unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        Artifact.open(tmp_path / "doc")


def test_model_mismatch_names_both(tmp_path):
    write_artifact(tmp_path / "doc")
    other = {**MODEL, "weights": {"model.safetensors": [124, "abd"]}}
    with pytest.raises(ModelMismatchError, match="tiny-llama.*other-model"):
        Artifact.open(tmp_path / "doc", expect_fingerprint=other, expect_name="other-model")


def test_existing_artifact_is_kept_unless_overwrite(tmp_path):
    write_artifact(tmp_path / "doc", seed=0)
    with pytest.raises(FileExistsError):
        write_artifact(tmp_path / "doc", seed=1)
    assert not list(tmp_path.glob(".doc.tmp-*"))
    new = write_artifact(tmp_path / "doc", seed=1, overwrite=True)
    assert torch.equal(Artifact.open(tmp_path / "doc").read_tensors("anchors")["k0"], new["anchors"]["k0"])
    assert not list(tmp_path.glob(".doc.*"))


def test_failure_inside_the_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ArtifactWriter(tmp_path / "doc") as w:
            w.put_bytes("x.bin", b"123")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_artifact import write_artifact
    import rcengine.storage.artifact as artifact
    where = sys.argv[2]
    if where == "before-commit":
        real = artifact.ArtifactWriter.commit
        def commit(self, *a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        artifact.ArtifactWriter.commit = commit
    elif where == "between-renames":
        real_rename = os.rename
        calls = []
        def rename(src, dst):
            calls.append(src)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(src, dst)
        artifact.os.rename = rename
    write_artifact(sys.argv[1], seed=1, overwrite=True)
    """
)


def _killed_write(location: Path, where: str) -> None:
    script = _KILLER.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script, str(location), where], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr


def test_killed_before_commit_keeps_old_artifact(tmp_path):
    old = write_artifact(tmp_path / "doc", seed=0)
    _killed_write(tmp_path / "doc", "before-commit")
    assert torch.equal(Artifact.open(tmp_path / "doc").read_tensors("anchors")["k0"], old["anchors"]["k0"])
    _killed_write(tmp_path / "fresh", "before-commit")
    with pytest.raises(ArtifactError, match="no prefill artifact"):
        Artifact.open(tmp_path / "fresh")


def test_a_killed_writers_temporary_is_reclaimed_and_a_live_ones_is_not(tmp_path):
    _killed_write(tmp_path / "doc", "before-commit")
    (stale,) = temporaries(tmp_path / "doc")  # left by the killed writer: visible, with its size
    assert not stale.live and stale.bytes > 0 and stale.path.name.startswith(".doc.tmp-")
    live = ArtifactWriter(tmp_path / "doc")  # a writer still at work: its own folder stays
    assert [t.path for t in live.reclaimed] == [stale.path] and not stale.path.exists()
    live.put_bytes("x.bin", b"123")
    other = subprocess.run([sys.executable, "-c", _RECLAIM, str(tmp_path / "doc")], capture_output=True, text=True, check=True)
    assert other.stdout.split() == ["[]", "True"]  # another process sees it live and leaves it
    assert Path(live.root).exists()
    live.abort()
    assert temporaries(tmp_path / "doc") == [] and not list(tmp_path.glob(".doc.tmp-*"))


_RECLAIM = textwrap.dedent(
    """
    import sys
    from rcengine.storage import reclaim_stale, temporaries
    print([str(t.path) for t in reclaim_stale(sys.argv[1])], all(t.live for t in temporaries(sys.argv[1])))
    """
)


def test_a_store_under_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        ArtifactWriter(tmp_path / "afile" / "store")


def test_killed_between_renames_leaves_none_and_says_where_the_old_one_is(tmp_path):
    write_artifact(tmp_path / "doc", seed=0)
    _killed_write(tmp_path / "doc", "between-renames")
    with pytest.raises(ArtifactError, match="previous artifact is at .*old-"):
        Artifact.open(tmp_path / "doc")
    old = next(tmp_path.glob(".doc.old-*"))
    old.rename(tmp_path / "doc")
    Artifact.open(tmp_path / "doc", expect_fingerprint=MODEL)


_READER = textwrap.dedent(
    """
    import sys, torch, hashlib
    from rcengine.storage import Artifact, DiskTier
    art = Artifact.open(sys.argv[1])
    tier = DiskTier.open(art.kv_location, checksums=art.kv_checksums, cache_bytes=0)
    h = hashlib.sha256()
    for _ in range(20):
        for layer in range(2):
            k, v = tier.gather(layer, torch.arange(50).flip(0).repeat(2, 1))
            h.update(k.view(torch.int16).numpy().tobytes())
    print(h.hexdigest())
    """
)


def test_concurrent_readers(tmp_path):
    write_artifact(tmp_path / "doc")
    procs = [subprocess.Popen([sys.executable, "-c", _READER, str(tmp_path / "doc")], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1 and len(outs[0]) == 64


def test_url_artifact_round_trip(tmp_path):
    url = f"memory://{tmp_path.name}/doc"
    ref = write_artifact(url)
    art = Artifact.open(url, expect_fingerprint=MODEL)
    assert art.kv_location.startswith("memory://")  # never a local path
    tier = DiskTier.open(art.kv_location, checksums=art.kv_checksums)
    k, _ = tier.gather(0, torch.arange(50).repeat(2, 1))
    assert torch.equal(k.view(torch.int16), ref["k"][0].view(torch.int16))
    manifest = json.loads(art.fs.cat(f"{art.root}/manifest.json"))
    assert manifest["kv_checksums"]


def test_block_reader_verifies_each_block(tmp_path):
    data = bytes(range(256)) * 40  # 10240 bytes: blocks of 4096, 4096, 2048
    with ArtifactWriter(tmp_path / "doc") as w:
        w.put_bytes("keys.f32", data, block_bytes=4096)
        w.commit(MODEL, {}, {})
    reader = Artifact.open(tmp_path / "doc").block_reader("keys.f32")
    assert reader.num_blocks == 3
    assert b"".join(reader.read(i) for i in range(3)) == data
    _flip(tmp_path / "doc" / "keys.f32", 5000)
    reader = Artifact.open(tmp_path / "doc").block_reader("keys.f32")
    assert reader.read(0) == data[:4096]  # other blocks still read
    with pytest.raises(CorruptChunkError, match="block 1 of file 'keys.f32'"):
        reader.read(1)


_SCRATCH = textwrap.dedent(
    """
    import os, sys
    from rcengine.storage import Scratch
    s = Scratch(sys.argv[1])
    (s.path / "kv.bin").write_bytes(b"x" * 1000)
    print(s.path, flush=True)
    if sys.argv[2] == "killed":
        os._exit(0)  # no clean-up, as after SIGKILL
    sys.stdin.read()  # alive until the test closes stdin
    """
)


def test_a_killed_processes_scratch_store_is_reclaimed_and_a_live_ones_is_not(tmp_path):
    killed = subprocess.run([sys.executable, "-c", _SCRATCH, str(tmp_path), "killed"], capture_output=True, text=True, check=True)
    stale = Path(killed.stdout.strip())
    live = subprocess.Popen([sys.executable, "-c", _SCRATCH, str(tmp_path), "live"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    alive = Path(live.stdout.readline().strip())
    (tmp_path / "rcengine-kv-nolock").mkdir()  # no lock file: not known to be ours, left alone
    mine = Scratch(tmp_path)  # this process's own
    found = {t.path: t for t in stale_scratch(tmp_path)}
    assert set(found) == {stale, alive, mine.path}
    assert not found[stale].live and found[stale].bytes == 1000 and found[alive].live and found[mine.path].live
    assert [t.path for t in reclaim_stale_scratch(tmp_path)] == [stale]
    assert not stale.exists() and not stale.with_name(stale.name + ".lock").exists() and alive.exists() and mine.path.exists()
    live.communicate("")  # the live process ends normally, never having removed it: removed at its exit
    assert not alive.exists() and not alive.with_name(alive.name + ".lock").exists()
    assert reclaim_stale_scratch(tmp_path) == []
    mine.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rcengine-kv-nolock"]

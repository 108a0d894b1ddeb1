"""The command line, run as a user runs it: results on stdout, one-line errors with exit code 2.
In this process (``cli_run.rc``) but for the entry point, signals and import weight."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_run import Ran, rc, rc_process
from tiny_models import save_tiny_model




@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "llama", "llama", max_positions=512)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "qwen2", "qwen2")


PROMPT = "Rivers run to the sea, and the sea is never full. " * 12


def test_info_json():
    out = rc("info", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["packages"]["torch"] != "not installed"
    assert {"cpu", "disk"} <= set(report["tiers"])
    assert report["tiers"]["cpu"]["available"] is True


def test_generate_json(model, tmp_path):
    """The console script's module in a new process (the other tests run the same app in this one)."""
    out = rc_process("generate", PROMPT, "--model", str(model), "--offload", "disk", "--method", "rc", "--budget", "0.1",
             "--max-new-tokens", "5", "--json", "--tail", "16")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in ("text", "prompt_tokens", "new_tokens", "method", "offload", "budget", "bytes", "decode_ms_per_token"):
        assert key in result
    assert {"logical", "physical", "by_tier"} <= set(result["bytes"])
    assert result["method"] == "rc" and result["offload"] == "disk" and result["budget"] == 0.1
    assert result["bytes"]["logical"] > 0 and "disk" in result["bytes"]["by_tier"]


def test_prefill_then_ask_matches_generate_store(model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(PROMPT)
    out = rc("prefill", str(doc), "--store", str(tmp_path / "store"), "--model", str(model), "--tail", "16")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokens"] > 0
    a = rc("ask", str(tmp_path / "store"), " What?", "--model", str(model), "--json", "--max-new-tokens", "4")
    b = rc("ask", str(tmp_path / "store"), " What?", "--model", str(model), "--json", "--max-new-tokens", "4")
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["text"] == json.loads(b.stdout)["text"]


def _assert_one_line_error(out: Ran, fragment: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    assert fragment in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_bad_input_exits_2_with_one_line(model, other_model, tmp_path):
    _assert_one_line_error(rc("generate", "--prompt-file", str(tmp_path / "missing.txt"), "--model", str(model)), "does not exist")
    (tmp_path / "empty.txt").write_text("  \n")
    _assert_one_line_error(rc("generate", "--prompt-file", str(tmp_path / "empty.txt"), "--model", str(model)), "is empty")
    _assert_one_line_error(rc("generate", "hi", "--model", str(model), "--budget", "1.5"), "(0, 1]")
    _assert_one_line_error(rc("generate", "hi", "--model", str(model), "--budget", "0"), "(0, 1]")
    _assert_one_line_error(rc("generate", "word " * 600, "--model", str(model)), "positions")
    _assert_one_line_error(rc("generate", "hi", "--model", str(tmp_path / "nomodel")), "does not exist")
    (tmp_path / "afile").write_text("x")
    _assert_one_line_error(rc("generate", PROMPT, "--model", str(model), "--store", str(tmp_path / "afile" / "store")),
                           "afile is a file, not a folder")
    _assert_one_line_error(rc("frobnicate"), "No such command")
    _assert_one_line_error(rc("generate", "hi", "--model", str(model), "--method", "foo"), "--method")
    _assert_one_line_error(rc("generate", "hi", "--model", str(model), "--device", "foo"), "'foo' is not a device")
    if torch.cuda.is_available():  # the machine decides what --device cuda means
        _assert_one_line_error(rc("generate", "hi", "--model", str(model), "--device", f"cuda:{torch.cuda.device_count()}"),
                               "GPU(s)")
        assert rc("generate", "hi", "--model", str(model), "--device", "cuda", "--max-new-tokens", "1").returncode == 0
    else:
        _assert_one_line_error(rc("generate", "hi", "--model", str(model), "--device", "cuda"), "no CUDA GPU")
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "config.json").write_text("{not json")
    _assert_one_line_error(rc("generate", "hi", "--model", str(broken)), "config.json is not valid JSON")
    untokenized = tmp_path / "untokenized"
    shutil.copytree(model, untokenized)
    (untokenized / "tokenizer.json").unlink()
    _assert_one_line_error(rc("generate", "hi", "--model", str(untokenized)), "untokenized has no tokenizer (tokenizer.json")
    (untokenized / "tokenizer.json").write_text("{not json")
    _assert_one_line_error(rc("generate", "hi", "--model", str(untokenized)), "untokenized does not load (")


def test_info_shows_a_stores_interrupted_prefills(model, tmp_path):
    (tmp_path / "doc.txt").write_text(PROMPT)
    assert rc("prefill", str(tmp_path / "doc.txt"), "--store", str(tmp_path / "store"), "--model", str(model)).returncode == 0
    stale = tmp_path / ".store.tmp-deadbeef"  # as an interrupted writer leaves it (no live lock)
    stale.mkdir()
    (stale / "kv.bin").write_bytes(b"x" * 1000)
    report = json.loads(rc("info", "--json", "--store", str(tmp_path / "store")).stdout)["store"]
    assert report["tokens"] > 0 and report["temporaries"] == [{"path": str(stale), "bytes": 1000, "live": False}]
    out = rc("prefill", str(tmp_path / "doc.txt"), "--store", str(tmp_path / "store"), "--model", str(model), "--overwrite")
    assert out.returncode == 0 and f"removed {stale}" in out.stderr and not stale.exists()


def test_store_of_another_model_is_refused_and_kept(model, other_model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(PROMPT)
    assert rc("prefill", str(doc), "--store", str(tmp_path / "store"), "--model", str(model)).returncode == 0
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*"))
    manifest = (tmp_path / "store" / "manifest.json").read_bytes()
    _assert_one_line_error(rc("ask", str(tmp_path / "store"), "hi", "--model", str(other_model)), "was made with model llama")
    _assert_one_line_error(rc("prefill", str(doc), "--store", str(tmp_path / "store"), "--model", str(model)), "already exists")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*")) == before
    assert (tmp_path / "store" / "manifest.json").read_bytes() == manifest
    assert rc("ask", str(tmp_path / "store"), "hi", "--model", str(model), "--max-new-tokens", "2").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budgets", "2"], "budgets must be fractions"),
        (["--budgets", "a,b"], "--budgets"),
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--tiers", "tape"], "tiers must be some of"),
        (["--io-bandwidth", "ssd=fast"], "NAME=GB/s"),
        (["--lengths", "100"], "lengths must be at least 256"),
    ],
)
def test_bench_io_bad_input(args, message, tmp_path):
    out = rc("bench-io", *args, "--out", str(tmp_path / "r"))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_bench_io_refuses_a_file_as_output(tmp_path):
    target = tmp_path / "report"
    target.write_text("keep me")
    out = rc("bench-io", "--quick", "--out", str(target))
    assert out.returncode == 2 and "not a folder" in out.stderr
    assert target.read_text() == "keep me"


def test_bench_io_runs_on_a_local_model(model, tmp_path):
    out = rc("bench-io", "--model", str(model), "--lengths", "300", "--tasks", "niah_single_word", "--examples", "1",
             "--budgets", "0.05", "--estimators", "centroid", "--max-new-tokens", "3", "--io-bandwidth", "nvme=3",
             "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert "rc-centroid@0.05" in out.stdout and "rho*" in out.stdout
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["meta"]["model_path"] == str(model.resolve()) and report["meta"]["model"] == model.name
    assert report["meta"]["config"]["bandwidths"] == [["nvme", 3e9]]
    assert {r["tier"] for r in report["rows"]} == {"cpu", "disk"}


_LIGHT = """
import sys
import rcengine
heavy = ("torch", "transformers", "matplotlib", "rich", "faiss", "zarr")
print(sorted(m for m in heavy if m in sys.modules))
sys.argv = ["rcengine", "--help"]
from rcengine.cli.app import main
try:
    main()
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers", "faiss", "zarr", "matplotlib") if m in sys.modules), file=sys.stderr)
"""


def test_import_and_help_are_light():
    out = subprocess.run([sys.executable, "-c", _LIGHT], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines()[0] == "[]"  # import rcengine: no torch, transformers, matplotlib, rich, faiss, zarr
    assert out.stderr.strip().splitlines()[-1] == "[]"  # rcengine --help: no torch or the rest either


def test_calibrate_writes_maps_that_another_model_refuses(model, other_model, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(PROMPT * 4)
    out = rc("calibrate", "--model", str(model), "--text", str(text), "--features", "4", "--directions", "2", "--steps", "3",
             "--out", str(tmp_path / "maps"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["layers"] == 2
    assert "layer 1: loss" in out.stderr  # progress, per layer
    again = rc("calibrate", "--model", str(model), "--text", str(text), "--out", str(tmp_path / "maps"))
    _assert_one_line_error(again, "--overwrite")
    _assert_one_line_error(rc("calibrate", "--model", str(model), "--out", str(tmp_path / "m2")), "--text is needed")
    refused = rc("generate", PROMPT, "--model", str(other_model), "--estimator", "learned", "--maps", str(tmp_path / "maps"),
                 "--features", "4", "--max-new-tokens", "2")
    _assert_one_line_error(refused, "calibrated for another model")
    ok = rc("generate", PROMPT, "--model", str(model), "--estimator", "learned", "--maps", str(tmp_path / "maps"),
            "--features", "4", "--max-new-tokens", "2", "--json", "--tail", "16", "--offload", "disk")
    assert ok.returncode == 0, ok.stderr
    doc = tmp_path / "doc.txt"
    doc.write_text(PROMPT)
    made = rc("prefill", str(doc), "--store", str(tmp_path / "store"), "--model", str(model), "--estimator", "learned",
              "--maps", str(tmp_path / "maps"), "--features", "4", "--tail", "16")
    assert made.returncode == 0, made.stderr
    shutil.rmtree(tmp_path / "maps")  # the store holds the maps it was built with
    info = json.loads(rc("info", "--json", "--store", str(tmp_path / "store")).stdout)["store"]
    assert info["estimator"]["kind"] == "learned"
    asked = rc("ask", str(tmp_path / "store"), " What?", "--model", str(model), "--json", "--max-new-tokens", "2")
    assert asked.returncode == 0, asked.stderr



def test_disk_block_cache_size_option(model, tmp_path):
    """--cache-mb sizes the disk tier's block cache: none at all works too (blocks are read when
    asked, and not kept), with the same answer."""
    args = ("generate", PROMPT, "--model", str(model), "--offload", "disk", "--method", "rc", "--budget", "0.5",
            "--max-new-tokens", "3", "--json", "--tail", "16")
    none = rc(*args, "--cache-mb", "0")
    assert none.returncode == 0, none.stderr
    default = rc(*args)
    assert json.loads(none.stdout)["text"] == json.loads(default.stdout)["text"]


def test_a_terminated_generate_removes_its_scratch_store_and_a_killed_ones_goes_next(tmp_path):
    """SIGTERM unwinds like Ctrl-C (exit 143, the scratch store removed); after SIGKILL the next
    scratch prefill in that folder removes what was left, and says so."""
    long_model = save_tiny_model(tmp_path / "llama", "llama", max_positions=4096)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    args = [sys.executable, "-m", "rcengine.cli.app", "generate", PROMPT, "--model", str(long_model), "--offload", "disk",
            "--max-new-tokens", "3800", "--tail", "16"]
    for sig, code in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGKILL, -signal.SIGKILL)):
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not list(scratch.glob("rcengine-kv-*/kv.zarr")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # until the prefill has made its scratch store
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-2000:]
        assert "Traceback" not in err
        if sig == signal.SIGTERM:
            assert list(scratch.iterdir()) == []  # removed, lock included
    (left,) = [p for p in scratch.iterdir() if p.is_dir()]  # the killed one's
    out = subprocess.run([*args[:-4], "--max-new-tokens", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"removed {left}" in out.stderr and list(scratch.iterdir()) == []


def test_a_store_url_is_refused_never_taken_for_a_path(model, tmp_path, monkeypatch):
    """``s3://bucket/doc`` once became a local folder ``s3:`` (click's Path drops a slash); a URL
    rcengine cannot store to (anything but ``s3://``) is refused in one line, never taken for a path,
    and ``file://`` names a folder.  (``s3://`` stores: tests/test_object_store.py.)"""
    monkeypatch.chdir(tmp_path)
    doc = tmp_path / "doc.txt"
    doc.write_text(PROMPT)
    for args in (("prefill", str(doc), "--store", "gs://bucket/doc.rcs", "--model", str(model)),
                 ("generate", PROMPT, "--store", "az://bucket/doc.rcs", "--model", str(model)),
                 ("ask", "http://bucket/doc.rcs", "hi", "--model", str(model)),
                 ("info", "--store", "gs://bucket/doc.rcs")):
        _assert_one_line_error(rc(*args), "is a URL rcengine cannot store to")
    for bad, why in (("s3://Bad_Bucket/doc", "not a valid bucket name"), ("s3://bucket", "a store is a prefix"),
                     ("s3://bucket/../doc", "a store is a prefix")):
        _assert_one_line_error(rc("info", "--store", bad), why)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.txt"]
    made = rc("prefill", str(doc), "--store", f"file://{tmp_path}/store", "--model", str(model), "--tail", "16")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "store" / "manifest.json").is_file()
    import rcengine

    engine = rcengine.Engine.load(model, show_progress=False)
    with pytest.raises(ValueError, match="is a URL"):
        engine.prefill(PROMPT, store="gs://bucket/doc.rcs")
    with pytest.raises(ValueError, match="is a URL"):
        engine.open("gs://bucket/doc.rcs")

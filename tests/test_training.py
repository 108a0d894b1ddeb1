"""The training pipeline (train/train_model.py), at a tiny size on the CPU: a run stopped at once
leaves a whole checkpoint, the resumed run finishes the same schedule, and what it saves is what
rcengine ships (bf16 safetensors, a tokenizer) and loads.

The GPU machine allows 10 minutes a command, so the real schedule is always split this way;
nothing here times anything (``--stop-after 0`` stops at the first batch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rcengine import Engine, EngineConfig, SamplingConfig, demo_prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder as train/prepare_data.py writes it, from the demo document: a 512-token BPE."""
    folder = tmp_path_factory.mktemp("train_data")
    text = demo_prompt().document
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.split("\n\n"), trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    np.asarray(tok.encode(text).ids, dtype=np.uint16).tofile(folder / "train.u16")
    return folder


def _train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train" / "train_model.py"), "--data", str(data), "--out", str(out), "--tiny", "--variety",
           "--workers", "0", "--phases", "128:1,256:1", "--tokens-per-step", "512", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_a_stopped_run_resumes_and_saves_what_rcengine_loads(data: Path, tmp_path: Path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    stopped = _train(data, out, "--stop-after", "0", "--checkpoint", str(ckpt))
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert f"--resume {ckpt}" in stopped.stdout
    state = json.loads((ckpt / "state.json").read_text())
    assert state["phase"] == 0 and state["step"] == 0 and state["phases"] == [[128, 1.0], [256, 1.0]]
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "model" / "config.json").is_file()
    assert not (out / "model").exists()
    assert not ckpt.with_name(ckpt.name + ".tmp").exists()  # written whole, then renamed

    other = _train(data, out, "--resume", str(ckpt), "--phases", "128:2")
    assert other.returncode == 2 and "--phases must be the stopped run's" in other.stderr

    resumed = _train(data, out, "--resume", str(ckpt), "--checkpoint", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    events = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if "event" in e] == ["start", "stop", "resume", "end"]
    assert events[-1]["steps"] > 0

    model = out / "model"
    shards = sorted(model.glob("*.safetensors"))
    assert shards and all(s.stat().st_size <= 16 << 20 for s in shards)
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    assert json.loads((model / "config.json").read_text())["vocab_size"] == 512
    engine = Engine.load(model, EngineConfig(method="dense", offload="cpu"), show_progress=False)
    answer = engine.generate("The", SamplingConfig(max_new_tokens=2))
    assert answer.stats["decode_steps"] >= 1

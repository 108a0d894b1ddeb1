"""GGUF checkpoints, through transformers' own GGUF support, converted once into a checkpoint folder.

A ``.gguf`` file (llama.cpp's format: weights, often quantized, with the tokenizer and the
configuration in its metadata) is checked (readable, a supported architecture), dequantised by
transformers into float32 (every quantized value is exact there; the model is then loaded in the
compute dtype like any folder) and written as a safetensors checkpoint folder under the cache
(``cache_root()/gguf/<sha256 of the file>``), so that later loads read that folder and take
seconds.  The folder is written under a temporary name, fsynced and renamed into place, by one
converter at a time (a lock beside it); a converter that died leaves a temporary the next one
removes.  Fingerprints and stores then work as for any folder.

Every version-dependent detail of transformers' GGUF loading stays in this module.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .file_hashes import cache_root, sha256_file

# Architectures (GGUF's ``general.architecture``) whose transformers models rcengine runs.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
# Written last into a finished folder: what it was made from.
DONE_FILE = "rcengine-gguf.json"
WEIGHTS_FILE = "model.safetensors"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message says what and how to fix it."""


def gguf_architecture(path: Path) -> str:
    """The file's architecture, after reading its header and tensor table (a truncated or damaged
    file fails here, before any conversion)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError("loading a GGUF file needs the gguf package: pip install gguf accelerate (or make setup)") from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = str(field.contents())
    except KeyError:
        raise GGUFError(f"{path} names no architecture (general.architecture): it is not a model GGUF") from None
    except (ValueError, IndexError, TypeError, OSError, UnicodeDecodeError) as e:
        raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:80]}): it may be truncated or "
                        "damaged; download it again") from None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path} holds a {arch!r} model; rcengine runs {', '.join(SUPPORTED_ARCHITECTURES)} GGUF files")
    return arch


def converted_folder(digest: str) -> Path:
    return cache_root() / "gguf" / digest[:32]


def converted_from(folder: Path) -> str | None:
    """The SHA-256 of the GGUF file ``folder`` was converted from, if it is an intact conversion
    (its weights still the ones written); else None.  Conversions by different transformers
    releases differ in bookkeeping (version fields, tokenizer settings), not in the weights, so a
    converted model is identified by its source file, not by the folder's bytes."""
    try:
        done = json.loads((folder / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or not all(isinstance(done.get(k), str) and _HEX64.fullmatch(done[k])
                                             for k in ("sha256", "weights_sha256")):
        return None
    try:
        weights = sha256_file(folder / WEIGHTS_FILE)
    except OSError:
        return None
    return done["sha256"] if weights == done["weights_sha256"] else None


def convert_gguf(path: str | Path, expect_sha256: str | None = None, log: Callable[[str], None] | None = None,
                 trust_remote_code: bool = False) -> Path:
    """The checkpoint folder converted from the GGUF file at ``path`` (made on first use).
    ``expect_sha256``: refuse a file with another SHA-256 (a packaged model's known file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist" if not path.exists() else f"{path} is not a regular file")
    digest = sha256_file(path)
    if expect_sha256 is not None and digest != expect_sha256:
        raise GGUFError(f"{path} has SHA-256 {digest[:16]}..., not the expected {expect_sha256[:16]}...: the file is damaged "
                        "or another version; reinstall its package")
    folder = converted_folder(digest)
    if (folder / DONE_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(folder.parent / f"{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"waiting for another process converting {path.name}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / DONE_FILE).is_file():  # converted by the process we waited for
            return folder
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by a converter that died (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if folder.exists():  # a folder without its done file: an interrupted rename or a damaged cache entry
            shutil.rmtree(folder)
        arch = gguf_architecture(path)
        if log is not None:
            log(f"converting {path.name} ({arch}) into {folder} (once)")
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_checkpoint(path, tmp, trust_remote_code)
            done = {"source": path.name, "sha256": digest, "architecture": arch,
                    "weights_sha256": sha256_file(tmp / WEIGHTS_FILE, remember=False)}
            (tmp / DONE_FILE).write_text(json.dumps(done))
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(lock)
    return folder


def _write_checkpoint(path: Path, out: Path, trust_remote_code: bool) -> None:
    """Dequantise with transformers and write config, weights (float32 safetensors; a tied output
    embedding is not written twice) and tokenizer into ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name, "local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        from transformers import GgufConfig  # transformers >= 5.24 keeps GGUF blocks packed unless told otherwise
    except ImportError:
        GgufConfig = None  # noqa: N806 (older releases always dequantise)
    quant = {"quantization_config": GgufConfig(gguf_file=path.name, dequantize=True)} if GgufConfig is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs, **quant)
    except ImportError as e:
        raise GGUFError(f"loading a GGUF file needs more packages ({str(e).strip().splitlines()[0][:120]}): "
                        "pip install gguf accelerate (or make setup)") from None
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise GGUFError(f"transformers cannot convert {path} ({first})") from None
    config = model.config
    for name in ("quantization_config",):
        if hasattr(config, name):
            delattr(config, name)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)

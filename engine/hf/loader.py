"""Loading a Hugging Face causal LM from a local folder, weights through safetensors only (a GGUF
file or a named model is first made into such a folder: ``models.py``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .file_hashes import sha256_file
from .gguf import converted_from
from .integration import check_supported, kv_shape, use_rcengine_attention
from .models import NAMED_MODELS, default_model_path, resolve_model  # noqa: F401 (default_model_path: public API)

# A tokenizer needs one of these (the rest of _TOKENIZER_FILES configure it).
_TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# config.json fields that record the writer, not the model.
_CONFIG_BOOKKEEPING = ("transformers_version", "_name_or_path")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    device: torch.device
    name: str = ""  # what the user called it: a known name, or the folder's or file's name
    maps: Path | None = None  # learned maps shipped for it (a named model's)
    _fingerprint: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.name = self.name or self.path.name

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim)."""
        return kv_shape(self.model.config)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id if self.model.generation_config else None, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source is not None:
                ids.update(source)
        return ids

    def fingerprint(self) -> dict:
        """Identity of the model for persisted prefills and learned maps, from its content alone
        (not where it lies: a copy in another folder is the same model): the configuration (less
        the fields that name the transformers release that wrote it), the weight files (sizes and
        SHA-256, remembered per file version: ``file_hashes.py``) and tokenizer files, or for a
        converted GGUF the source file's SHA-256 instead of both; and the dtype it computes in."""
        if self._fingerprint is None:
            fp = {"model_type": self.model.config.model_type, "config_sha256": config_digest(self.path / "config.json")}
            source = converted_from(self.path)
            if source is not None:
                fp["gguf_sha256"] = source
            else:
                fp["weights"] = {p.name: [p.stat().st_size, sha256_file(p)] for p in sorted(self.path.glob("*.safetensors"))}
                tok = hashlib.sha256()
                for name in _TOKENIZER_FILES:
                    p = self.path / name
                    if p.exists():
                        tok.update(name.encode() + b"\0" + p.read_bytes())
                fp["tokenizer_sha256"] = tok.hexdigest()
            fp["dtype"] = str(self.dtype).removeprefix("torch.")
            self._fingerprint = fp
        return self._fingerprint


def config_digest(path: Path) -> str:
    """SHA-256 of a config.json's content, canonical (sorted keys) and without the fields that
    say which release or folder wrote it."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in _CONFIG_BOOKKEEPING:
        config.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def compute_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked against this machine (None: CUDA when present, else the CPU)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a device: use cpu or cuda (cuda:N for the N-th GPU)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported: use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} is not available: this torch build or machine has no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def load_model(
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a local checkpoint folder (config.json, *.safetensors, tokenizer files), a GGUF file
    (converted once: ``gguf.py``) or a named model (``tiny``, ``smollm2``:
    ``models.py``); None loads the embedded default model.  ``device`` defaults to CUDA when
    present; ``dtype`` to bfloat16 on CUDA and float32 on the CPU.  ``log``: one-time work (a
    conversion) is announced there."""
    dev = compute_device(device)  # before a conversion, which takes a while
    source = resolve_model(path, log)
    folder = source.folder
    if not folder.is_dir():
        if not folder.exists():
            raise FileNotFoundError(f"model {path} does not exist: it is neither a folder, a .gguf file nor a known name "
                                    f"({', '.join(NAMED_MODELS)})")
        raise NotADirectoryError(f"model {path} is a file but not a .gguf file: give a checkpoint folder or a GGUF file")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a model folder: it has no config.json")
    if not list(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} has no *.safetensors weights (rcengine loads no pickled weights)")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON ({e}): repair or replace the model folder") from None
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    check_supported(config)
    if not any((folder / name).exists() for name in _TOKENIZER_VOCABS):
        raise FileNotFoundError(f"{folder} has no tokenizer ({', '.join(_TOKENIZER_VOCABS)}): copy the checkpoint's tokenizer "
                                "files into the folder")
    dt = dtype if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, use_safetensors=True, dtype=dt, trust_remote_code=trust_remote_code
    )
    use_rcengine_attention(model)
    model.to(dev).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the tokenizer in {folder} does not load ({first}): repair or replace its tokenizer files") from None
    return LoadedModel(model, tokenizer, folder.resolve(), dev, source.name, source.maps)

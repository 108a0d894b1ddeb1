"""Loading a Hugging Face causal LM from a local folder, weights through safetensors only."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .integration import check_supported, kv_shape, use_rcengine_attention

# A tokenizer needs one of these (the rest of _TOKENIZER_FILES configure it).
_TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")


def default_model_path() -> Path:
    """The embedded default model shipped inside the package."""
    return Path(__file__).resolve().parents[1] / "default_model"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    device: torch.device
    _fingerprint: dict | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

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
        """Identity of the model for persisted prefills: config, weight files (sizes and SHA-256),
        tokenizer files.  Computed once per process (it reads every weight byte)."""
        if self._fingerprint is None:
            weights = {p.name: [p.stat().st_size, _sha256(p)] for p in sorted(self.path.glob("*.safetensors"))}
            tok = hashlib.sha256()
            for name in _TOKENIZER_FILES:
                p = self.path / name
                if p.exists():
                    tok.update(name.encode() + b"\0" + p.read_bytes())
            self._fingerprint = {
                "name": self.name,
                "model_type": self.model.config.model_type,
                "config_sha256": _sha256(self.path / "config.json"),
                "weights": weights,
                "tokenizer_sha256": tok.hexdigest(),
                "dtype": str(self.dtype).removeprefix("torch."),
            }
        return self._fingerprint


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


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
) -> LoadedModel:
    """Load a local checkpoint folder (config.json, *.safetensors, tokenizer files); None loads the
    embedded default model.  ``device`` defaults to CUDA when present; ``dtype`` to bfloat16 on
    CUDA and float32 on the CPU."""
    folder = Path(path) if path is not None else default_model_path()
    if path is None and not (folder / "config.json").exists():
        raise FileNotFoundError("this build has no embedded default model yet: pass a local model folder (--model DIR)")
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a model folder: it has no config.json")
    if not list(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} has no *.safetensors weights (rcengine loads no pickled weights)")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON ({e}): repair or replace the model folder") from None
    dev = compute_device(device)
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
    return LoadedModel(model, tokenizer, folder.resolve(), dev)

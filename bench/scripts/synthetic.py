"""Random-weight Llama models of real shapes for the speed benchmarks (no weights to download).

- :func:`random_llama`: built in memory on a device, for the GPU benchmarks (8B shape in seconds);
- :func:`save_random_llama`: saved as a local checkpoint folder with the embedded model's
  tokenizer, for benchmarks that load models by path.
"""

from __future__ import annotations

import hashlib

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ...engine.hf.integration import use_rcengine_attention
from ...engine.hf.loader import LoadedModel, default_model_path

# Llama-3-8B's attention and MLP shape (the vocabulary is the tokenizer's).
SHAPE_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128}
# A small real shape that decodes quickly on 2 CPU cores.
SHAPE_SMALL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 64}


def _config(shape: dict, vocab: int, max_positions: int, tokenizer) -> LlamaConfig:  # noqa: ANN001
    return LlamaConfig(vocab_size=vocab, max_position_embeddings=max_positions, rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=None, tie_word_embeddings=False, **shape)


def random_llama(shape: dict, max_positions: int, device: str | torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> LoadedModel:
    """A Llama of ``shape`` with random weights (std 0.02), the embedded tokenizer's vocabulary,
    built directly on ``device`` and using rcengine's attention."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    config = _config(shape, len(tokenizer), max_positions, tokenizer)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    use_rcengine_attention(model)
    model.eval()
    lm = LoadedModel(model, tokenizer, Path(f"random-llama-{config.num_hidden_layers}L-{config.hidden_size}"), torch.device(device))
    # No folder to hash: its fingerprint (for persisted stores) names the shape, the seed and the dtype.
    lm._fingerprint = {"name": lm.name, "model_type": "llama", "config_sha256": hashlib.sha256(config.to_json_string().encode()).hexdigest(),
                       "weights": {"random_normal_std_0.02_seed": seed}, "tokenizer_sha256": "", "dtype": str(dtype).removeprefix("torch.")}
    return lm


def save_random_llama(path: Path, shape: dict = SHAPE_SMALL, max_positions: int = 65536, seed: int = 0) -> Path:
    """A random Llama of ``shape`` saved as a checkpoint folder (float32 safetensors)."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(_config(shape, len(tokenizer), max_positions, tokenizer)).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path

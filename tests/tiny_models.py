"""Tiny random-weight models of each supported family, saved as local checkpoint folders."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TEXT = (
    "The quick brown fox jumps over the lazy dog. One of the special magic numbers for apple is 4821. "
    "Rivers run to the sea, and the sea is never full. What is the special magic number mentioned in the text? "
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026. "
) * 4

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def save_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def save_tiny_model(path: Path, family: str, seed: int = 0, layers: int = 2, max_positions: int = 4096) -> Path:
    """A 2-layer, 4-query-head / 2-KV-head, head-dim 16 model with sharp random logits."""
    path.mkdir(parents=True, exist_ok=True)
    tok = save_tokenizer(path)
    config_cls, model_cls = FAMILIES[family]
    extra = {"sliding_window": None} if family in ("mistral", "qwen2") else {}
    config = config_cls(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=max_positions, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(path, safe_serialization=True)
    return path

"""The seam with transformers: everything that depends on its version lives here.

rcengine plugs into transformers' own extension points, with no copy of model code:

- an attention function registered as ``"rcengine"`` (``AttentionInterface``): it reads the
  active :class:`RCCache` and computes prefill or decode attention with it;
- a mask function registered under the same name (``AttentionMaskInterface``): it returns no mask,
  since rcengine's attention applies causality itself;
- our Cache (cache.py), passed to the model as its cache;
- inside an rcengine step on a device Triton serves, the decoder layer's RMSNorm, rotary embedding
  and SiLU-gate product run as one kernel each (model_ops.py: the same values, one launch instead
  of up to ten): the norm and MLP modules' ``forward`` is routed per instance, the rotary function
  of the model's module is wrapped; both call the model's own code outside a step.

Versions: tested with transformers 5.17 (GPU machine), 5.23 and 5.24.  5.24 renamed the models'
``past_key_values`` argument to ``cache`` (the old name still works there, with a deprecation
warning until 5.40); :data:`CACHE_ARG` is the name this release takes.  Outside an :func:`active`
block the attention falls back to transformers' SDPA, so a model loaded with rcengine's attention
still runs stock code paths (``model.generate``) unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import transformers
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..decode.layer import decode_attention, prefill_attention
from ..decode.runner import Forward
from . import model_ops
from .cache import RCCache
from .group import GroupCache

ATTN_IMPLEMENTATION = "rcengine"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# The oldest and newest transformers releases this seam is tested with (pyproject pins the range).
TESTED_TRANSFORMERS = ("5.17", "5.24")
# The causal LMs' forward takes its cache as `cache` from 5.24 on, `past_key_values` before.
CACHE_ARG = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"

_ACTIVE: ContextVar[RCCache | None] = ContextVar("rcengine_active_cache", default=None)
# (layer, query (B, Hq, T, d), key (B, Hkv, T, d), value) of each stock attention call, post-RoPE.
Capture = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
_CAPTURE: ContextVar[Capture | None] = ContextVar("rcengine_capture", default=None)


@contextlib.contextmanager
def capturing(sink: Capture) -> Iterator[None]:
    """Within this block, stock (SDPA) attention calls of a model loaded with rcengine's attention
    hand their post-RoPE queries, keys and values to ``sink`` (calibration reads them)."""
    token = _CAPTURE.set(sink)
    try:
        yield
    finally:
        _CAPTURE.reset(token)


@contextlib.contextmanager
def active(cache: RCCache) -> Iterator[RCCache]:
    """Within this block, the model's attention layers use ``cache``'s method."""
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):  # noqa: ANN001, ANN003, ANN202
    """transformers attention interface: ``query (B, Hq, T, d)``, ``key/value (B, Hkv, T, d)``
    (the new tokens only: our cache keeps the rest) -> ``((B, T, Hq, d), None)``."""
    cache = _ACTIVE.get()
    if cache is None:
        capture = _CAPTURE.get()
        if capture is not None:
            capture(module.layer_idx, query, key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if cache.phase == "group":  # several documents: each span of the step's queries attends to its own
        return cache.attention(module.layer_idx, query, scale), None
    if cache.phase == "prefill":
        k, v = cache.prefill[module.layer_idx].view()
        return prefill_attention(k, v, query, scale), None
    return decode_attention(cache.state, module.layer_idx, query, scale), None


def _mask(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    """No mask while rcengine attends (it applies causality itself); SDPA's mask otherwise."""
    if _ACTIVE.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the attention and mask functions (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)


def use_rcengine_attention(model: PreTrainedModel) -> None:
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    route_model_ops(model)


# The supported families' modules whose operations model_ops computes (their code is Llama's).
_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")
_MLPS = ("LlamaMLP", "Qwen2MLP", "MistralMLP")
_ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "MistralAttention")


def _in_step(x: torch.Tensor) -> bool:
    return _ACTIVE.get() is not None and model_ops.usable(x)


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 (an RMSNorm module)
    if _in_step(hidden_states):
        return model_ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 (an MLP module)
    if _in_step(x):
        return self.down_proj(model_ops.silu_mul(self.gate_proj(x), self.up_proj(x)))
    return type(self).forward(self, x)


def _rotary_router(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not args and not kwargs and _in_step(q) and model_ops.rotary_fits(q, k, cos, sin, 1):
            return model_ops.rotary(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__wrapped__ = original
    apply_rotary_pos_emb.rcengine_router = True
    return apply_rotary_pos_emb


def route_model_ops(model: PreTrainedModel) -> None:
    """Route ``model``'s RMSNorm and SiLU MLP modules (per instance, as bound methods, so copies of
    the model keep theirs) and its modeling module's ``apply_rotary_pos_emb`` (once) to
    model_ops inside rcengine steps (idempotent)."""
    for module in model.modules():
        name = type(module).__name__
        if "forward" in vars(module):
            continue
        if name in _NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_forward, module)
        elif name in _MLPS and (isinstance(module.act_fn, torch.nn.SiLU) or type(module.act_fn).__name__ == "SiLUActivation"):
            module.forward = types.MethodType(_mlp_forward, module)
        elif name in _ATTENTIONS:
            source = sys.modules[type(module).__module__]
            original = getattr(source, "apply_rotary_pos_emb", None)
            if original is not None and not getattr(original, "rcengine_router", False):
                source.apply_rotary_pos_emb = _rotary_router(original)


def check_supported(config) -> None:  # noqa: ANN001 (a transformers PretrainedConfig)
    """Refuse architectures rcengine does not handle, with the reason."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported: rcengine runs rotary-attention decoders of the "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} families"
        )
    window = getattr(config, "sliding_window", None)
    use_window = getattr(config, "use_sliding_window", window is not None)
    if window is not None and use_window and window < getattr(config, "max_position_embeddings", window + 1):
        raise ValueError(f"sliding-window attention (window {window}) is not supported: rcengine attends over the whole context")
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % kv:
        raise ValueError(f"{heads} attention heads do not split into {kv} KV-head groups")


def kv_shape(config) -> tuple[int, int, int]:  # noqa: ANN001
    """(layers, KV heads, head dim) of a supported config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv, head_dim


def model_call(model: PreTrainedModel, input_ids: torch.Tensor, cache, keep: bool | torch.Tensor = False,  # noqa: ANN001
               position_ids: torch.Tensor | None = None):  # noqa: ANN201 (the model's output)
    """The model's forward with its cache under whichever argument name this release takes; logits
    of the last position (``keep`` False), of every one (True), or of the positions ``keep: (K,)``."""
    logits_to_keep = keep if isinstance(keep, torch.Tensor) else 0 if keep else 1
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=logits_to_keep,
                 **{CACHE_ARG: cache})


def rc_forward(model: PreTrainedModel, cache: RCCache) -> Forward:
    """The decode runner's model call: ``(ids, positions (1, T), keep) -> logits`` float32: ``(1,
    vocab)`` of the last position (``keep`` False), ``(1, T, vocab)`` of each (True), ``(1, K,
    vocab)`` of the positions in ``keep: (K,)``."""

    def forward(ids: torch.Tensor, positions: torch.Tensor, keep: bool | torch.Tensor) -> torch.Tensor:
        with active(cache):
            logits = model_call(model, ids, cache, keep, positions).logits
        return logits[:, -1].float() if keep is False else logits.float()

    return forward


def group_forward(model: PreTrainedModel, cache: GroupCache) -> Callable[[torch.Tensor, torch.Tensor, list[tuple[int, int]]], torch.Tensor]:
    """The model call of a step of several documents: ``(ids, positions (1, T), spans) -> logits
    (T, vocab)`` float32 of every token, ``spans[i]`` the tokens of ``cache.members[i]``."""

    def forward(ids: torch.Tensor, positions: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        cache.spans = spans
        with active(cache):
            return model_call(model, ids, cache, True, positions).logits[0].float()

    return forward


def prefill_chunk(model: PreTrainedModel, ids: torch.Tensor, cache: RCCache, start: int) -> torch.Tensor:
    """One prefill chunk ``ids (1, C)`` at positions ``start..`` -> logits of its last position ``(1, vocab)``."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
    with active(cache):
        return model_call(model, ids, cache, False, positions).logits[:, -1].float()


def stock_prefill(model: PreTrainedModel, prefix: list[int], chunk: int = 1024):  # noqa: ANN201 (DynamicCache, tensor)
    """Prefill ``prefix`` with the model's own attention into a transformers DynamicCache, in
    chunks; -> (cache, logits of the last position ``(1, vocab)``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    x = torch.tensor([prefix], device=next(model.parameters()).device)
    with torch.no_grad():
        for start in range(0, len(prefix), chunk):
            logits = model_call(model, x[:, start : start + chunk], cache).logits
    return cache, logits[:, -1]


def reference_logits(model: PreTrainedModel, prefix: list[int], continuations: list[list[int]], chunk: int = 1024) -> list[torch.Tensor]:
    """The model's own dense attention (transformers SDPA and its DynamicCache, no rcengine):
    teacher-forced logits ``(T_i, vocab)`` float32 of each continuation after ``prefix``.  The
    prefix is run once in chunks; the cache is cropped back to it between continuations."""
    device = next(model.parameters()).device
    cache, _ = stock_prefill(model, prefix, chunk)
    with torch.no_grad():
        outs = []
        for cont in continuations:
            out = model_call(model, torch.tensor([cont], device=device), cache, keep=True)
            outs.append(out.logits[0].float())
            cache.crop(-len(cont))  # negative: tokens to remove (5.17 and later; positive meant a length before)
    return outs

"""The decoder layer's small operations as kernels (engine/hf/model_ops.py) against the model's
own PyTorch code, and the seam that routes a model's modules to them inside rcengine steps.

The kernels run on CUDA, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1); the
routing tests run everywhere (the kernels replaced by counting stand-ins)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama import modeling_llama

from rcengine.engine.hf import integration, model_ops
from rcengine.storage.triton_support import available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
kernels_here = pytest.mark.skipif(not available(DEVICE), reason="needs CUDA, or Triton's interpreter on the CPU")
DTYPES = [torch.bfloat16, torch.float32]


def _original_rotary():
    fn = modeling_llama.apply_rotary_pos_emb
    return getattr(fn, "__wrapped__", fn) if getattr(fn, "rcengine_router", False) else fn


def _same_mostly(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal within one rounding of ``dtype``; in bfloat16 bit-equal almost everywhere (the kernels
    round where the model rounds; only a sum's order or exp's last float32 bit differ, which a
    bfloat16 rounding seldom shows)."""
    tol = {torch.bfloat16: 2e-2, torch.float32: 2e-6}[dtype]  # (bfloat16: two roundings, 2**-7 each)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    if dtype == torch.bfloat16:
        assert (got == want).float().mean().item() >= 0.98


@kernels_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 96), (1, 5, 4096), (2, 3, 64)])
def test_rms_norm_matches_the_model(gen, dtype, shape):
    norm = modeling_llama.LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen) * 0.5 + 1)
    norm = norm.to(DEVICE, dtype)
    x = (torch.randn(*shape, generator=gen) * 3).to(DEVICE, dtype)
    want = modeling_llama.LlamaRMSNorm.forward(norm, x)
    got = model_ops.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.shape == want.shape and got.dtype == want.dtype
    _same_mostly(got, want, dtype)


@kernels_here
def test_rms_norm_keeps_the_models_promotion(gen):
    """A float32 weight over bfloat16 hidden states gives float32, as ``weight * x.to(bf16)`` does."""
    norm = modeling_llama.LlamaRMSNorm(64, eps=1e-6).to(DEVICE)
    x = torch.randn(1, 2, 64, generator=gen).to(DEVICE, torch.bfloat16)
    want = modeling_llama.LlamaRMSNorm.forward(norm, x)
    got = model_ops.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == want.dtype == torch.float32
    _same_mostly(got, want, torch.bfloat16)


@kernels_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,cos_batch", [(1, 1, 1), (1, 4, 1), (2, 3, 2), (2, 3, 1)])
def test_rotary_matches_the_model(gen, dtype, b, t, cos_batch):
    """Queries and keys laid out as the model makes them (a transposed view of the projection)."""
    hq, hkv, d = 6, 2, 32
    q = torch.randn(b, t, hq, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(b, t, hkv, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    angles = torch.rand(cos_batch, t, d // 2, generator=gen) * 1000
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)
    assert model_ops.rotary_fits(q, k, cos, sin, 1)
    want_q, want_k = _original_rotary()(q, k, cos, sin)
    got_q, got_k = model_ops.rotary(q, k, cos, sin)
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert got.shape == want.shape and got.dtype == want.dtype
        if dtype == torch.bfloat16:  # every product and the sum rounded where the model rounds them
            assert torch.equal(got, want)
        else:  # (float32: the compiler may fuse a product into the sum)
            _same_mostly(got, want, dtype)


def test_rotary_fits_only_its_layout():
    q, k = torch.zeros(1, 4, 2, 16), torch.zeros(1, 2, 2, 16)
    cos = torch.zeros(1, 2, 16)
    assert model_ops.rotary_fits(q, k, cos, cos, 1)
    assert not model_ops.rotary_fits(q, k, cos, cos, 2)
    assert not model_ops.rotary_fits(q, k, cos.double(), cos.double(), 1)
    assert not model_ops.rotary_fits(q[..., :12], k[..., :12], cos[..., :12], cos[..., :12], 1)  # half not a power of two
    assert not model_ops.rotary_fits(q, k[:, :, :1], cos, cos, 1)


@kernels_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 352), (1, 3, 5000)])
def test_silu_mul_matches_the_model(gen, dtype, shape):
    gate = (torch.randn(*shape, generator=gen) * 4).to(DEVICE, dtype)
    up = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    want = torch.nn.functional.silu(gate) * up
    got = model_ops.silu_mul(gate, up)
    assert got.shape == want.shape and got.dtype == want.dtype
    _same_mostly(got, want, dtype)


def _tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    config = cls[0](vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return cls[1](config).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_seam_routes_a_models_ops_inside_steps_only(monkeypatch, family):
    """Inside an rcengine step every RMSNorm, MLP and rotary call of the model goes to model_ops
    (here stand-ins in float64 that count their calls), and the logits equal the model's own;
    outside a step, and with the kernels switched off, the model's own code runs."""
    calls = {"norm": 0, "rotary": 0, "silu": 0}

    def norm(x, w, eps):  # noqa: ANN001, ANN202
        calls["norm"] += 1
        x64 = x.double()
        return (w.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(torch.promote_types(w.dtype, x.dtype))

    def rotary(q, k, cos, sin):  # noqa: ANN001, ANN202
        calls["rotary"] += 1
        c, s = cos.double()[:, None], sin.double()[:, None]
        half = lambda x: torch.cat([-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]], -1)  # noqa: E731
        return tuple((x.double() * c + half(x.double()) * s).to(x.dtype) for x in (q, k))

    def silu(g, u):  # noqa: ANN001, ANN202
        calls["silu"] += 1
        return (torch.nn.functional.silu(g.double()) * u.double()).to(g.dtype)

    monkeypatch.setattr(model_ops, "usable", lambda x: model_ops.ENABLED)
    monkeypatch.setattr(model_ops, "rms_norm", norm)
    monkeypatch.setattr(model_ops, "rotary", rotary)
    monkeypatch.setattr(model_ops, "silu_mul", silu)
    model = _tiny(family)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        integration.route_model_ops(model)
        integration.route_model_ops(model)  # idempotent: one router each
        assert model(input_ids=ids).logits.equal(want) and sum(calls.values()) == 0  # outside a step
        with integration.active(object()):
            got = model(input_ids=ids).logits
            layers = model.config.num_hidden_layers
            assert calls == {"norm": 2 * layers + 1, "rotary": layers, "silu": layers}
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            monkeypatch.setattr(model_ops, "ENABLED", False)
            model(input_ids=ids)
            assert calls == {"norm": 2 * layers + 1, "rotary": layers, "silu": layers}
            monkeypatch.setattr(model_ops, "ENABLED", True)
            twin = copy.deepcopy(model)  # a copy's modules route to their own weights
            with torch.no_grad():
                for p in twin.parameters():
                    p.mul_(0.5)
            assert not torch.allclose(twin(input_ids=ids).logits, got)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):  # noqa: ANN001, ANN201
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@kernels_here
@pytest.mark.parametrize("method", ["dense", "rc"])
def test_decode_with_the_kernels_equals_the_models_own_ops(tiny_llama, method, monkeypatch):
    """A prefill and greedy decode through the engine, the model's ops as kernels or as its own
    code: the same tokens (float32, the tiny model's sharp logits)."""
    from rcengine import Engine, EngineConfig, SamplingConfig

    ids = torch.randint(3, 300, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    out = {}
    for enabled in (False, True):
        monkeypatch.setattr(model_ops, "ENABLED", enabled)
        cfg = EngineConfig(method=method, budget=0.05, offload="cpu", sink=4, tail=16, spill=4)
        engine = Engine.load(tiny_llama, cfg, device=DEVICE, dtype=torch.float32, show_progress=False)
        with engine.prefill(ids) as doc:
            out[enabled] = doc.continue_prompt(SamplingConfig(max_new_tokens=12, ignore_eos=True)).token_ids
    assert out[True] == out[False]

"""The decoder layer's small operations as one Triton kernel each, for rcengine's steps.

In a decode step the weights' matrix products and the attention read almost every byte, but the
model's PyTorch code around them launches about 30 more kernels a layer: RMSNorm as seven
(convert, square, mean, add, rsqrt, scale, convert, weight), the rotary embedding as ten
(multiply, slice, negate, concatenate, add, for queries and for keys) and SiLU and the gate's
product as two.  In a captured step each is a launch and a gap (on the H200 at 128K, 1,204 small
kernels took 1.9 ms of a 12.3 ms step: bench/RESULTS.md).

Each function here is one kernel that computes the same values in the same dtypes: it rounds to
the model's dtype wherever the model's code does (after every elementwise operation of a bf16
tensor, to nearest, by integer arithmetic: see ``_round``), so the results equal the model's own
bit for bit but for the order of one sum (RMSNorm's mean) and the last bit of exp (SiLU).

- :func:`rms_norm`: ``x (..., H)``, ``weight (H,)`` -> ``weight * (x / rms(x)).to(x.dtype)``;
- :func:`rotary`: queries ``(B, Hq, T, d)`` and keys ``(B, Hkv, T, d)`` (any strides), ``cos,
  sin (B or 1, T, d)`` -> ``x * cos + rotate_half(x) * sin`` of each;
- :func:`silu_mul`: ``gate, up (..., F)`` -> ``silu(gate) * up``.

The seam (integration.py) routes the model's modules to them only inside an rcengine step on a
device Triton serves; everywhere else the model's own code runs.
"""

from __future__ import annotations

import torch

from ...storage.triton_support import available, tl, triton
from ..decode.kernels import _pow2

# The switch the benchmarks flip to time the model's own operations side by side.
ENABLED = True


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels here serve ``x``'s device (and are switched on)."""
    return ENABLED and available(x.device)


BF16, F16, F32 = 1, 2, 0  # how a kernel rounds a float32 value to a tensor's dtype (_round's KIND)


def _kind(dtype: torch.dtype) -> int:
    return {torch.bfloat16: BF16, torch.float16: F16}.get(dtype, F32)


if triton is not None:

    @triton.jit
    def _round(x, KIND: tl.constexpr):
        """``x`` float32 rounded to the nearest value of the dtype KIND names (ties to even), still
        float32.  bfloat16 by integer arithmetic on the bits: the compiler cannot fold it away with
        the conversion back, and Triton's interpreter (which truncates its conversions) agrees."""
        if KIND == 1:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            return b.to(tl.float32, bitcast=True)
        elif KIND == 2:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, eps, BLOCK: tl.constexpr, XK: tl.constexpr, OK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / n
        y = _round(x * tl.math.rsqrt(var + eps), XK)  # hidden_states.to(input_dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + offs, _round(w * y, OK).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, hq, hkv, t,
                       sqb, sqh, sqt, skb, skh, skt, scb, sct, HALF: tl.constexpr, K: tl.constexpr):
        """One program per (batch, position, head of the queries then of the keys)."""
        pid = tl.program_id(0)
        heads = hq + hkv
        b = pid // (t * heads)
        pos = (pid // heads) % t
        h = pid % heads
        offs = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + b * scb + pos * sct + offs).to(tl.float32)
        c2 = tl.load(cos_ptr + b * scb + pos * sct + HALF + offs).to(tl.float32)
        s1 = tl.load(sin_ptr + b * scb + pos * sct + offs).to(tl.float32)
        s2 = tl.load(sin_ptr + b * scb + pos * sct + HALF + offs).to(tl.float32)
        is_q = h < hq
        hk = tl.where(is_q, 0, h - hq)
        hq_ = tl.where(is_q, h, 0)
        src = tl.where(is_q, b * sqb + hq_ * sqh + pos * sqt, b * skb + hk * skh + pos * skt)
        # The outputs are contiguous (B, H, T, d) tensors.
        dst = tl.where(is_q, ((b * hq + hq_) * t + pos) * 2 * HALF, ((b * hkv + hk) * t + pos) * 2 * HALF)
        if is_q:
            x1 = tl.load(q_ptr + src + offs)
            x2 = tl.load(q_ptr + src + HALF + offs)
        else:
            x1 = tl.load(k_ptr + src + offs)
            x2 = tl.load(k_ptr + src + HALF + offs)
        ty = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        # (x * cos) + (rotate_half(x) * sin), rotate_half(x) = cat(-x2, x1), each product rounded
        # to the model's dtype and then the sum, as the model's PyTorch code does.
        o1 = _round(_round(x1 * c1, K) + _round(-x2 * s1, K), K).to(ty)
        o2 = _round(_round(x2 * c2, K) + _round(x1 * s2, K), K).to(ty)
        if is_q:
            tl.store(qo_ptr + dst + offs, o1)
            tl.store(qo_ptr + dst + HALF + offs, o2)
        else:
            tl.store(ko_ptr + dst + offs, o1)
            tl.store(ko_ptr + dst + HALF + offs, o2)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr, K: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        ty = g.dtype
        g = g.to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = _round(g / (1.0 + tl.exp(-g)), K)  # act_fn(gate) in the model's dtype
        tl.store(out_ptr + offs, _round(s * u, K).to(ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x (..., H)``, ``weight (H,)`` -> ``(..., H)`` in ``promote(weight, x)``'s dtype (as the
    model's ``weight * hidden_states.to(input_dtype)``)."""
    h = x.shape[-1]
    x2 = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rows = x2.numel() // h if h else 0
    if rows:
        block = _pow2(h, at_least=1)
        _rms_norm_kernel[(rows,)](x2, weight.contiguous(), out, h, eps, BLOCK=block, XK=_kind(x.dtype), OK=_kind(out.dtype),
                                  num_warps=8 if block >= 2048 else 4)
    return out


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q (B, Hq, T, d)``, ``k (B, Hkv, T, d)`` (any strides whose last is 1), ``cos, sin (B or
    1, T, d)`` -> contiguous ``(q_embed, k_embed)``, the shapes and dtype of ``q`` and ``k``."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    qo = torch.empty((b, hq, t, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((b, hkv, t, d), dtype=k.dtype, device=k.device)
    if b * t:
        scb = 0 if cos.shape[0] == 1 else cos.stride(0)
        _rotary_kernel[(b * t * (hq + hkv),)](
            q, k, cos, sin, qo, ko, hq, hkv, t, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            scb, cos.stride(1), HALF=d // 2, K=_kind(q.dtype), num_warps=1,
        )
    return qo, ko


def rotary_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether :func:`rotary` computes this call of the model's ``apply_rotary_pos_emb``: the layout
    above, one dtype, a head dim whose half is a power of two."""
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    b, _, t, d = q.shape
    half = d // 2
    return (k.shape[0] == b and k.shape[2] == t and k.shape[3] == d and cos.shape[1:] == (t, d) and cos.shape[0] in (1, b)
            and d % 2 == 0 and half >= 1 and half & (half - 1) == 0
            and q.dtype == k.dtype == cos.dtype == sin.dtype and q.device == k.device == cos.device == sin.device)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate, up (..., F)`` of one dtype -> ``silu(gate) * up``, rounded as the model rounds."""
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    if n:
        block = 1024
        _silu_mul_kernel[(triton.cdiv(n, block),)](g, u, out, n, BLOCK=block, K=_kind(g.dtype), num_warps=4)
    return out

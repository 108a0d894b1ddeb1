"""The fixed-size feature-map summary of a mid-region, built in streaming fashion.

Per sequence and KV head, with r features and head dim d:

- ``beta: (B, Hkv, r)``   one log-scale per feature: the largest a_f(k_j) seen (-inf if none)
- ``S:    (B, Hkv, r, d)`` sum_j exp(a(k_j) - beta) v_j
- ``u:    (B, Hkv, r)``   sum_j exp(a(k_j) - beta)
- ``v_max: (B, Hkv)``     the largest ||v_j|| (bounds the estimate's mean value)
- ``count: (B, Hkv)``     tokens folded in

Every term is <= 1, so nothing overflows.  Kept in float32 (float64 for references): in bf16 the
decode-time subtraction of the retrieved tokens' share cancels catastrophically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_FIELDS = ("beta", "S", "u", "v_max", "count")


@dataclass
class Summary:
    beta: torch.Tensor
    S: torch.Tensor
    u: torch.Tensor
    v_max: torch.Tensor
    count: torch.Tensor

    @staticmethod
    def empty(
        batch: int,
        num_kv_heads: int,
        num_features: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "Summary":
        """A summary of no tokens."""
        shape = (batch, num_kv_heads, num_features)
        return Summary(
            beta=torch.full(shape, -math.inf, dtype=dtype, device=device),
            S=torch.zeros(*shape, head_dim, dtype=dtype, device=device),
            u=torch.zeros(shape, dtype=dtype, device=device),
            v_max=torch.zeros(batch, num_kv_heads, dtype=dtype, device=device),
            count=torch.zeros(batch, num_kv_heads, dtype=torch.int64, device=device),
        )

    @property
    def num_features(self) -> int:
        return self.S.shape[-2]

    def fold(self, ak: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add tokens in place: ``ak: (B, Hkv, n, r)`` their key log-features a(k), ``v: (B, Hkv,
        n, d)`` their values, ``valid: (B, Hkv, n)`` which of them to add (None = all).

        Used for the prefill's chunks and for tokens that later leave the tail.  When a feature's
        log-scale rises, what was accumulated under the old one is rescaled by exp(old - new).
        """
        if ak.shape[-2] == 0:
            return
        dt = self.S.dtype
        ak = ak.to(dt)
        v = v.to(dt)
        if valid is not None:
            ak = ak.masked_fill(~valid[..., None], -math.inf)
        beta_new = torch.maximum(self.beta, ak.amax(dim=-2))  # (B, Hkv, r)
        ref = torch.where(torch.isfinite(beta_new), beta_new, torch.zeros_like(beta_new))
        # Old accumulations are zero wherever the old log-scale was -inf.
        rescale = torch.where(torch.isfinite(self.beta), torch.exp(self.beta - ref), 0.0)
        e = torch.exp(ak - ref[:, :, None, :])  # (B, Hkv, n, r), <= 1
        # In place: a captured decode step keeps reading these same tensors after a fold.
        self.S.mul_(rescale[..., None]).add_(torch.matmul(e.transpose(-1, -2), v))
        self.u.mul_(rescale).add_(e.sum(dim=-2))
        self.beta.copy_(beta_new)
        norms = torch.linalg.vector_norm(v, dim=-1)  # (B, Hkv, n)
        if valid is not None:
            norms = norms.masked_fill(~valid, 0.0)
            self.count.add_(valid.sum(dim=-1))
        else:
            self.count.add_(ak.shape[-2])
        self.v_max.copy_(torch.maximum(self.v_max, norms.amax(dim=-1)))

    def nbytes_per_head(self) -> int:
        """Bytes held per (sequence, KV head): S, u and beta (v_max and count are negligible)."""
        r, d = self.S.shape[-2:]
        return r * (d + 2) * self.S.element_size()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors, e.g. for safetensors."""
        return {name: getattr(self, name) for name in _FIELDS}

    @staticmethod
    def from_state_dict(state: dict[str, torch.Tensor]) -> "Summary":
        missing = [name for name in _FIELDS if name not in state]
        if missing:
            raise ValueError(f"summary state lacks {', '.join(missing)}")
        summary = Summary(**{name: state[name] for name in _FIELDS})
        b, h, r, d = summary.S.shape
        expected = {"beta": (b, h, r), "u": (b, h, r), "v_max": (b, h), "count": (b, h)}
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(f"summary {name} has shape {tuple(state[name].shape)}, expected {shape}")
        return summary
